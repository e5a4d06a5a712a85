"""Quantized layers on CUDA: built there, forward there, state_dict round trip there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedConv2d, QuantizedEmbedding, QuantizedLinear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIGS = {
    "int8-weight-only": LayerQuantConfig(bits=8),
    "int8-dynamic": LayerQuantConfig(bits=8, activation="dynamic"),
    "int8-asym-dynamic": LayerQuantConfig(bits=8, symmetric=False, activation="dynamic"),
    "int4-g32": LayerQuantConfig(bits=4, symmetric=False, group_size=32),
}


@pytest.mark.parametrize("batch", [4, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_on_cuda_matches_cpu_and_round_trips(ref, name, batch):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    x = torch.randn(batch, 128)
    cpu_layer = QuantizedLinear.from_float(linear, CONFIGS[name])
    gpu_layer = QuantizedLinear.from_float(linear.cuda(), CONFIGS[name])
    assert gpu_layer.qweight.device.type == "cuda"
    assert gpu_layer.qweight.dtype == (torch.int8 if CONFIGS[name].bits == 8 else torch.uint8)
    out = gpu_layer(x.cuda())
    assert out.device.type == "cuda"
    assert sqnr(cpu_layer(x), out.cpu()) > 35
    restored = ref.rebuild(gpu_layer, nn.Linear(128, 64).cuda())
    assert torch.equal(restored(x.cuda()), out)


def test_half_precision_activations_on_cuda():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).cuda()
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=4, group_size=32))
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert sqnr(linear(x.float()), out.float()) > 15


def test_conv_and_embedding_on_cuda():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3).cuda()
    qconv = QuantizedConv2d.from_float(conv, LayerQuantConfig(bits=8))
    images = torch.randn(2, 4, 9, 9, device="cuda")
    assert sqnr(conv(images), qconv(images)) > 33
    embedding = nn.Embedding(50, 64).cuda()
    qemb = QuantizedEmbedding.from_float(embedding, LayerQuantConfig(bits=4, group_size=32))
    ids = torch.randint(0, 50, (3, 5), device="cuda")
    out = qemb(ids)
    assert out.device.type == "cuda"
    assert sqnr(embedding(ids), out) > 15
