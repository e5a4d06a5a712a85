"""int4 on the CPU: torch's int4 kernel layout in memory, the documented layout outside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import pack_int4, sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedLinear, build_quantized_module
from mono_quant.modules.kernels import cpu_int4_supported, from_cpu_int4_layout, to_cpu_int4_layout

needs_kernel = pytest.mark.skipif(
    not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"), reason="this torch has no CPU int4 kernel"
)
INT4 = LayerQuantConfig(bits=4, symmetric=False, group_size=128)


@needs_kernel
def test_layout_matches_torch_converter_and_round_trips():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (192, 256), dtype=torch.uint8)
    packed = pack_int4(q)
    blocked = to_cpu_int4_layout(packed)
    assert torch.equal(blocked, torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
    assert torch.equal(from_cpu_int4_layout(blocked), packed)


@needs_kernel
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 1], ids=["one_chunk", "chunks", "block_by_block"])
def test_layout_conversion_in_chunks_matches_torch_converter(monkeypatch, chunk_bytes):
    # the conversion goes a few 64-row blocks at a time through reused buffers (a last chunk
    # shorter than the others included): the bytes are the converter's whatever the chunking
    monkeypatch.setattr("mono_quant.modules.kernels._LAYOUT_CHUNK_BYTES", chunk_bytes)
    q = torch.randint(0, 16, (64 * 5, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    blocked = to_cpu_int4_layout(pack_int4(q))
    assert torch.equal(blocked, torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


@needs_kernel
def test_layer_uses_kernel_layout_but_state_dict_is_documented_layout():
    torch.manual_seed(0)
    float_layer = nn.Linear(256, 128)
    layer = QuantizedLinear.from_float(float_layer, INT4)
    assert layer.qweight_layout == "cpu_int4"
    state = layer.state_dict()
    # the documented layout: low nibble = even input feature, row-major [N, K // 2]
    expected = pack_int4(layer._weight_tensor().qdata)
    assert torch.equal(state["qweight"], expected)
    restored = build_quantized_module(nn.Linear(256, 128), INT4)
    restored.load_state_dict(state)
    x = torch.randn(5, 256)
    assert torch.equal(restored(x), layer(x))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_cpu_kernel_matches_dequantized_reference(rows):
    torch.manual_seed(rows)
    layer = QuantizedLinear.from_float(nn.Linear(512, 256), INT4)
    x = torch.randn(rows, 512)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    # activations run in bf16 inside the kernel: ~50 dB, far above int4's own weight error (~20 dB)
    assert sqnr(reference, layer(x)) > 40.0


def test_shapes_the_kernel_cannot_take_fall_back_to_int_mm():
    torch.manual_seed(0)
    # the layout's blocks are 64 (AVX-512) or 32 (AVX2) output rows: 80 fits neither
    assert not cpu_int4_supported(out_features=80, in_features=256, group_size=128)
    layer = QuantizedLinear.from_float(nn.Linear(256, 80), INT4)
    assert layer.qweight_layout == "packed"
    x = torch.randn(3, 256)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert sqnr(reference, layer(x)) > 60.0
