"""Device-agnostic quantization: a CUDA model is quantized on CUDA and runs there.

Each result is compared with the same quantization done on the CPU (SQNR between the two, so
the CUDA kernels' different rounding and accumulation order are allowed for) and with the
float model. Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mono_quant.core.quantizers import dynamic_quantize, static_quantize
from mono_quant.core.schemes import INT4_ASYMMETRIC, INT8_SYMMETRIC, PerChannel, PerGroup, quantize_weight, sqnr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on_cuda(model: nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        assert tensor.device.type == "cuda", tensor.shape


@pytest.mark.parametrize(
    "spec, granularity", [(INT8_SYMMETRIC, PerChannel(0)), (INT4_ASYMMETRIC, PerGroup(32))], ids=["int8", "int4"]
)
def test_quantize_weight_on_cuda_matches_cpu(spec, granularity):
    torch.manual_seed(0)
    weight = torch.randn(200, 128)
    cpu = quantize_weight(weight, spec, granularity, clip_search_steps=8 if spec.bits == 4 else 0)
    gpu = quantize_weight(weight.cuda(), spec, granularity, clip_search_steps=8 if spec.bits == 4 else 0)
    assert gpu.qdata.device.type == "cuda"
    torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=1e-6, atol=0)
    mismatched = (gpu.qdata.cpu().int() - cpu.qdata.int()).abs()
    assert mismatched.max() <= 1 and (mismatched > 0).float().mean() < 1e-3


# batch 32 takes the _int_mm path on CUDA (M > 16); batch 4 the dequantized fallback
@pytest.mark.parametrize("batch", [4, 32])
@pytest.mark.parametrize(
    "kwargs, min_vs_float",
    [
        ({"dtype": torch.qint8}, 30.0),
        ({"dtype": torch.qint8, "weight_only": True}, 36.0),
        ({"dtype": "int4", "group_size": 32}, 15.0),
        ({"dtype": torch.float16}, 50.0),
    ],
    ids=["int8-dynamic", "int8-weight-only", "int4-g32", "fp16"],
)
def test_dynamic_mlp_on_cuda(mlp, batch, kwargs, min_vs_float):
    x = torch.randn(batch, 32)
    cpu_model, _ = dynamic_quantize(mlp, **kwargs)
    expected = cpu_model(x)
    gpu_float = mlp.cuda()
    gpu_model, skipped = dynamic_quantize(gpu_float, **kwargs)
    assert skipped == []
    _on_cuda(gpu_model)
    out = gpu_model(x.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert sqnr(expected, out.cpu()) > 35
    assert sqnr(gpu_float(x.cuda()).cpu(), out.cpu()) > min_vs_float


def test_static_mlp_on_cuda(mlp):
    calibration = torch.randn(64, 32)
    cpu_model, _ = static_quantize(mlp, calibration)
    gpu_model, info = static_quantize(mlp.cuda(), calibration)  # data moved to the model's device
    assert info.calibration_samples_used == 64
    _on_cuda(gpu_model)
    torch.testing.assert_close(gpu_model[0].input_scale.cpu(), cpu_model[0].input_scale)
    x = torch.randn(32, 32)
    out = gpu_model(x.cuda())
    assert out.device.type == "cuda"
    assert sqnr(cpu_model(x), out.cpu()) > 35


def test_cnn_and_lstm_models_on_cuda(cnn, lstm_model):
    images = torch.randn(8, 3, 16, 16)
    cpu_cnn, _ = static_quantize(cnn, images)
    gpu_cnn, _ = static_quantize(cnn.cuda(), images.cuda())
    _on_cuda(gpu_cnn)
    assert sqnr(cpu_cnn(images), gpu_cnn(images.cuda()).cpu()) > 30

    tokens = torch.randint(0, 50, (4, 12))
    cpu_lstm, _ = dynamic_quantize(lstm_model)
    gpu_lstm, _ = dynamic_quantize(lstm_model.cuda())
    _on_cuda(gpu_lstm)
    out = gpu_lstm(tokens.cuda())
    assert out.device.type == "cuda"
    assert sqnr(cpu_lstm(tokens), out.cpu()) > 35
