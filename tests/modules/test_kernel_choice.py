"""Which CPU kernel runs a layer, by shape and CPU features, and that every choice computes the
same layer: the fast paths against the generic ones, with the feature detection forced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedLinear, kernels
from mono_quant.modules import linear as linear_module
from mono_quant.modules.cpu_features import CpuFeatures

needs_int4_kernel = pytest.mark.skipif(
    not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel"
)
needs_onednn = pytest.mark.skipif(not kernels.onednn_int8_available(), reason="this torch has no oneDNN int8 linear")

XEON_AMX = CpuFeatures(amx_int8=True, amx_bf16=True, avx512_vnni=True, avx512_bf16=True, avx512=True, avx2=True)
ZEN4 = CpuFeatures(avx512_vnni=True, avx512_bf16=True, avx512=True, avx2=True)
GENERIC = CpuFeatures()
INT4 = LayerQuantConfig(bits=4, symmetric=False, group_size=64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture
def force_features(monkeypatch):
    """Make the kernel choice see ``features`` instead of this CPU's."""

    def force(features: CpuFeatures) -> None:
        monkeypatch.setattr(kernels, "cpu_features", lambda: features)

    return force


@pytest.fixture
def int4_calls(monkeypatch):
    """Records which CPU int4 path each forward takes."""
    calls: list[str] = []
    dense, kernel = kernels.cpu_int4_dense_linear, kernels.cpu_int4_linear

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(linear_module, "cpu_int4_dense_linear", spy("dense", dense))
    monkeypatch.setattr(linear_module, "cpu_int4_linear", spy("int4_kernel", kernel))
    return calls


def _int4_layer(out_features: int, in_features: int, config: LayerQuantConfig = INT4) -> QuantizedLinear:
    torch.manual_seed(out_features + in_features)
    layer = QuantizedLinear.from_float(nn.Linear(in_features, out_features), config)
    assert layer.qweight_layout == "cpu_int4"
    return layer


# -- int4: the dense path at many rows -----------------------------------------------------------
@needs_int4_kernel
@pytest.mark.parametrize(
    "features, threshold", [(XEON_AMX, 96), (ZEN4, 128), (GENERIC, None)], ids=["amx", "avx512-bf16", "generic"]
)
def test_int4_path_is_chosen_by_rows_and_features(force_features, int4_calls, features, threshold):
    force_features(features)
    assert kernels.cpu_int4_dense_min_rows() == threshold
    layer = _int4_layer(128, 256)
    for rows in (1, 64, 95, 96, 127, 128, 300):
        int4_calls.clear()
        layer(torch.randn(rows, 256))
        expected = "dense" if threshold is not None and rows >= threshold else "int4_kernel"
        assert int4_calls == [expected], (rows, int4_calls)


@needs_int4_kernel
@pytest.mark.parametrize(
    "out_features, in_features, group_size",
    [(192, 256, 64), (128, 384, 128), (64, 512, 32), (256, 128, 128)],
    ids=["3-blocks", "3-groups", "g32", "small-k"],
)
@pytest.mark.parametrize("blocks_per_chunk", [None, 2], ids=["one-chunk", "chunked"])
def test_int4_dense_matches_dequantized_reference(
    monkeypatch, force_features, out_features, in_features, group_size, blocks_per_chunk
):
    force_features(XEON_AMX)
    if blocks_per_chunk:  # several slices, the last one partial where the blocks do not divide
        monkeypatch.setattr(kernels, "_DENSE_CHUNK_ELEMENTS", blocks_per_chunk * 64 * in_features)
    config = LayerQuantConfig(bits=4, symmetric=False, group_size=group_size)
    layer = _int4_layer(out_features, in_features, config)
    x = torch.randn(200, in_features)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    out = layer(x)
    assert out.shape == (200, out_features) and out.dtype == torch.float32
    # bf16 activations and a bf16-rounded centred weight: ~50 dB, as the int4 kernel (int4's own
    # weight error against the float layer is ~20 dB)
    assert sqnr(reference, out) > 40.0, sqnr(reference, out)


@needs_int4_kernel
def test_int4_generic_fallback_matches_fast_path(force_features):
    layer = _int4_layer(192, 512)
    x = torch.randn(300, 512) * 3
    force_features(GENERIC)
    generic = layer(x)
    force_features(XEON_AMX)
    fast = layer(x)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert _cosine(generic, fast) > 0.9999
    assert sqnr(generic, fast) > 40.0
    assert sqnr(reference, generic) > 40.0 and sqnr(reference, fast) > 40.0


@needs_int4_kernel
def test_int4_dense_keeps_no_state_and_survives_a_round_trip(force_features):
    force_features(XEON_AMX)
    layer = _int4_layer(128, 256)
    x = torch.randn(100, 256)
    before = layer(x)
    state = layer.state_dict()
    assert set(state) == {"qweight", "weight_scale", "weight_zero_point", "bias"}
    restored = QuantizedLinear.empty_like(nn.Linear(256, 128), INT4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x), before)


# -- int8 dynamic: one row runs its own path ----------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dynamic_single_row_matches_the_row_in_a_batch(ref, symmetric):
    torch.manual_seed(0)
    float_layer = nn.Linear(96, 80)
    layer = QuantizedLinear.from_float(float_layer, LayerQuantConfig(bits=8, symmetric=symmetric, activation="dynamic"))
    x = torch.randn(6, 96) * torch.logspace(-2, 2, 6).unsqueeze(1)
    batched = layer(x)
    for row in range(6):
        alone = layer(x[row : row + 1])
        # per token is per tensor for one row: the same numbers up to fp32 rounding of the scale
        torch.testing.assert_close(alone, batched[row : row + 1], rtol=1e-4, atol=1e-4)
        reference = F.linear(ref.per_token(x[row : row + 1]), layer.dequantized_weight(), float_layer.bias)
        torch.testing.assert_close(alone, reference, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("activation", ["dynamic", "none"])
def test_int8_int_mm_fallback_matches_onednn(monkeypatch, rows, activation):
    """Without oneDNN (non-x86 builds) int8 runs on ``_int_mm``: same numbers."""
    torch.manual_seed(rows)
    float_layer = nn.Linear(64, 48)
    config = LayerQuantConfig(bits=8, symmetric=True, activation=activation)
    fast = QuantizedLinear.from_float(float_layer, config)
    x = torch.randn(rows, 64)
    fast_out = fast(x)
    assert fast.qweight_layout == "onednn"
    monkeypatch.setattr(linear_module, "onednn_int8_available", lambda: False)
    generic = QuantizedLinear.from_float(float_layer, config)
    generic_out = generic(x)
    assert generic.qweight_layout == "packed"
    torch.testing.assert_close(generic_out, fast_out, rtol=1e-4, atol=1e-4)
