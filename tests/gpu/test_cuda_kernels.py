"""CUDA paths of the quantized layers (skipped without a GPU).

Each CUDA output is compared with the same layer's CPU output or a dequantized-weight
reference, by SQNR with a stated floor: kernels differ in accumulation order and, for
tinygemm, in bf16 activations, so equality is not expected.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant import load_quantized, quantize
from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedLinear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _linear(in_features=512, out_features=256, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("rows", [4, 64], ids=["m4-fallback", "m64-int_mm"])
@pytest.mark.parametrize("activation", ["dynamic", "none"])
def test_int8_linear_cuda_matches_cpu(rows, activation):
    layer = QuantizedLinear.from_float(_linear(), LayerQuantConfig(bits=8, activation=activation))
    x = torch.randn(rows, 512)
    cpu_out = layer(x)
    gpu_out = layer.to("cuda")(x.cuda())
    assert gpu_out.device.type == "cuda"
    assert sqnr(cpu_out, gpu_out.cpu()) > 35.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-tinygemm", "fp32-dequant"])
def test_int4_linear_cuda_matches_dequantized_reference(dtype):
    float_layer = _linear(1024, 512)
    layer = QuantizedLinear.from_float(float_layer, LayerQuantConfig(bits=4, symmetric=False, group_size=128))
    x = torch.randn(32, 1024)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    out = layer.to("cuda")(x.cuda().to(dtype))
    assert out.dtype == dtype
    floor = 30.0 if dtype == torch.bfloat16 else 60.0
    assert sqnr(expected, out.float().cpu()) > floor


def test_quantize_cuda_model_stays_on_cuda_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda()
    x = torch.randn(64, 256, device="cuda")
    for kwargs in ({"bits": 8, "dynamic": True}, {"bits": 4}, {"bits": 8, "calibration_data": x}):
        result = quantize(model, **kwargs)
        assert result, result.errors
        assert all(t.device.type == "cuda" for t in result.model.state_dict().values())
        out = result.model(x)
        assert out.device.type == "cuda"
        assert sqnr(model(x), out) > 15.0
        path = result.save(tmp_path / "m.safetensors")
        skeleton = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda()
        restored = load_quantized(path, skeleton)
        assert torch.equal(restored(x), out)


def test_conv_embedding_lstm_on_cuda():
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.lstm = nn.LSTM(32, 32, batch_first=True)
            self.conv = nn.Conv1d(32, 16, 3, padding=1)

        def forward(self, tokens):
            h = self.lstm(self.emb(tokens))[0]
            return self.conv(h.transpose(1, 2))

    model = Mixed().cuda().eval()
    tokens = torch.randint(0, 100, (4, 12), device="cuda")
    result = quantize(model, bits=8, dynamic=True)
    assert result, result.errors
    assert sqnr(model(tokens), result.model(tokens)) > 25.0
