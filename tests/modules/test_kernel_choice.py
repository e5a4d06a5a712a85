"""Which CPU kernel runs a layer, by shape and CPU features, and that every choice computes the
same layer: the fast paths against the generic ones, with the feature detection forced."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import sqnr
from mono_quant.errors import ConfigurationError
from mono_quant.modules import LayerQuantConfig, QuantizedLinear, kernels
from mono_quant.modules import linear as linear_module
from mono_quant.modules.cpu_features import CpuFeatures

needs_int4_kernel = pytest.mark.skipif(
    not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel"
)

XEON_AMX = CpuFeatures(amx_int8=True, amx_bf16=True, avx512_vnni=True, avx512_bf16=True, avx512=True, avx2=True)
ZEN4 = CpuFeatures(avx512_vnni=True, avx512_bf16=True, avx512=True, avx2=True)
AVX512_NO_BF16 = CpuFeatures(avx512_vnni=True, avx512=True, avx2=True)  # Cascade Lake
AVX2_ONLY = CpuFeatures(avx2=True)
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
            # the dense path's GEMM dtype is that of its qparams (the third argument)
            calls.append(name if name != "dense" else f"dense_{str(args[2][0].dtype).removeprefix('torch.')}")
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
    "features, threshold, dense",
    [
        (XEON_AMX, 96, "dense_bfloat16"),
        (ZEN4, 80, "dense_bfloat16"),
        (AVX512_NO_BF16, None, None),
        (AVX2_ONLY, 64, "dense_float32"),
        (GENERIC, None, None),
    ],
    ids=["amx", "avx512-bf16", "avx512-no-bf16", "avx2-only", "generic"],
)
def test_int4_path_is_chosen_by_rows_and_features(force_features, int4_calls, features, threshold, dense):
    force_features(features)
    assert kernels.cpu_int4_dense_min_rows() == threshold
    layer = _int4_layer(128, 256)
    for rows in (1, 63, 64, 79, 80, 95, 96, 127, 128, 300):
        int4_calls.clear()
        layer(torch.randn(rows, 256))
        expected = dense if threshold is not None and rows >= threshold else "int4_kernel"
        assert int4_calls == [expected], (rows, int4_calls)


@needs_int4_kernel
@pytest.mark.parametrize(
    "out_features, in_features, group_size",
    [(192, 256, 64), (128, 384, 128), (64, 512, 32), (256, 128, 128)],
    ids=["3-blocks", "3-groups", "g32", "small-k"],
)
@pytest.mark.parametrize("blocks_per_chunk", [None, 2], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("features", [XEON_AMX, AVX2_ONLY], ids=["bf16", "fp32"])
def test_int4_dense_matches_dequantized_reference(
    monkeypatch, force_features, out_features, in_features, group_size, blocks_per_chunk, features
):
    force_features(features)
    if blocks_per_chunk:  # several slices, the last one partial where the blocks do not divide
        monkeypatch.setattr(kernels, "_DENSE_CHUNK_ELEMENTS", blocks_per_chunk * 64 * in_features)
    config = LayerQuantConfig(bits=4, symmetric=False, group_size=group_size)
    layer = _int4_layer(out_features, in_features, config)
    x = torch.randn(200, in_features)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    out = layer(x)
    assert out.shape == (200, out_features) and out.dtype == torch.float32
    if features is AVX2_ONLY:  # fp32 throughout: the reference up to float rounding
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
        return
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
    config = LayerQuantConfig(bits=8, symmetric=symmetric, activation="dynamic", activation_symmetric=True)
    layer = QuantizedLinear.from_float(float_layer, config)
    x = torch.randn(6, 96) * torch.logspace(-2, 2, 6).unsqueeze(1)
    batched = layer(x)
    for row in range(6):
        alone = layer(x[row : row + 1])
        # per token is per tensor for one row: the same numbers up to fp32 rounding of the scale
        torch.testing.assert_close(alone, batched[row : row + 1], rtol=1e-4, atol=1e-4)
        reference = F.linear(ref.per_token(x[row : row + 1]), layer.dequantized_weight(), float_layer.bias)
        torch.testing.assert_close(alone, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("activation", ["dynamic", "none"])
def test_int8_engines_and_the_int_mm_fallback_compute_the_same(monkeypatch, int8_engine, rows, activation):
    """oneDNN, fbgemm and (builds without either) ``_int_mm``: the same numbers."""
    torch.manual_seed(rows)
    float_layer = nn.Linear(64, 48)
    config = LayerQuantConfig(bits=8, symmetric=True, activation=activation)
    layer = QuantizedLinear.from_float(float_layer, config)
    x = torch.randn(rows, 64)
    out = layer(x)
    assert layer.qweight_layout == (int8_engine or "packed")
    monkeypatch.setattr(linear_module, "cpu_int8_engine", lambda: None)
    generic = QuantizedLinear.from_float(float_layer, config)
    generic_out = generic(x)
    assert generic.qweight_layout == "packed"
    torch.testing.assert_close(generic_out, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
def test_asymmetric_dynamic_int8_matches_its_reference_on_every_engine(ref, int8_engine, rows, one_sided):
    """``activation_symmetric=False``: each token on its own [min, max] grid with a zero point,
    on oneDNN, fbgemm and ``_int_mm`` alike, and a single row as the same row in a batch; on
    one-sided rows it is closer to the float layer than the symmetric grid."""
    torch.manual_seed(rows)
    float_layer = nn.Linear(96, 80)
    config = LayerQuantConfig(bits=8, symmetric=True, activation="dynamic", activation_symmetric=False)
    layer = QuantizedLinear.from_float(float_layer, config)
    x = torch.randn(rows, 96) * torch.logspace(-1, 1, rows).unsqueeze(1)
    if one_sided:  # a ReLU's / GELU's output: the symmetric grid leaves half its levels unused
        x = F.gelu(x * 3)
    out = layer(x)
    assert layer.qweight_layout == (int8_engine or "packed")
    reference = F.linear(ref.per_token_asymmetric(x), layer.dequantized_weight(), float_layer.bias)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x[-1:]), out[-1:], rtol=1e-4, atol=1e-4)
    symmetric = QuantizedLinear.from_float(float_layer, dataclasses.replace(config, activation_symmetric=True))
    exact = F.linear(x, layer.dequantized_weight(), float_layer.bias)  # the activations' error alone
    if one_sided:  # twice the levels on the side in use: ~6 dB (one row alone measured 3.7)
        assert sqnr(exact, out) > sqnr(exact, symmetric(x)) + 3.0


def test_quantize_per_token_asymmetric_codes_and_zero_points():
    """Codes in [-128, 127] with ``x ~ scale * (q - zero)``, ``zero`` the row's zero point
    minus 128 (an integer); the uint8 form is the same codes plus 128; the multiplier folds in."""
    torch.manual_seed(0)
    x = torch.randn(9, 40) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[0] = x[0].abs() + 1  # all positive: zero point 0
    x[1] = -x[1].abs() - 1  # all negative: zero point 255
    q, scale, zero = kernels.quantize_per_token_asymmetric(x)
    assert q.dtype == torch.int8 and int(q.min()) >= -128 and int(q.max()) <= 127
    assert torch.equal(zero, zero.round()) and zero[0].item() == -128 and zero[1].item() == 127
    assert (x - scale * (q.float() - zero)).abs().max() <= 0.5 * scale.max() * 1.0001
    u8, _, _ = kernels.quantize_per_token_asymmetric(x, 128, torch.uint8)
    assert torch.equal(u8.int() - 128, q.int())
    multiplier = torch.rand(40) + 0.25
    folded = kernels.quantize_per_token_asymmetric(x, multiplier=multiplier)
    for got, want in zip(folded, kernels.quantize_per_token_asymmetric(x * multiplier), strict=True):
        assert torch.equal(got, want)
    # unrounded fp32 codes, for fbgemm to round: the same codes once rounded, the same qparams
    raw, raw_scale, raw_zero = kernels.quantize_per_token_asymmetric(x, dtype=torch.float32, rounded=False)
    assert not torch.equal(raw, raw.round())
    assert torch.equal(raw.round().clamp(-128, 127), q.float()) and torch.equal(raw_scale, scale)
    assert torch.equal(raw_zero, zero)
    with pytest.raises(ValueError, match="unrounded"):
        kernels.quantize_per_token_asymmetric(x, 128, torch.uint8, rounded=False)


# -- int8: SmoothQuant's input multiplier folded into the per-token quantization ----------------
@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("codes", ["int8", "uint8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_folds_the_multiplier_exactly(terms, codes, dtype):
    torch.manual_seed(terms)
    x = (torch.randn(7, 48) * torch.logspace(-2, 2, 7).unsqueeze(1)).to(dtype)
    multiplier = torch.rand(48) + 0.25
    before = x.clone()
    kwargs = {"offset": 128, "dtype": torch.uint8} if codes == "uint8" else {}
    q, scale = kernels.quantize_per_token(x, terms, multiplier=multiplier, **kwargs)
    q_ref, scale_ref = kernels.quantize_per_token(x * multiplier, terms, **kwargs)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(x, before)  # the multiplied copy is scaled in place, never the input


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("activation", ["dynamic", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothed_int8_matches_multiplying_first_and_leaves_the_input_alone(int8_engine, rows, activation, dtype):
    torch.manual_seed(rows)
    float_layer = nn.Linear(64, 40)
    config = LayerQuantConfig(bits=8, symmetric=True, activation=activation)
    smoothed = QuantizedLinear.from_float(
        float_layer, dataclasses.replace(config, smoothed_input=True), input_smoothing=torch.rand(64) + 0.5
    )
    plain = QuantizedLinear.from_float(float_layer, config)
    x = (torch.randn(rows, 64) * 3).to(dtype)
    before = x.clone()
    out = smoothed(x)
    assert torch.equal(x, before)
    plain(x)
    assert torch.equal(x, before)
    assert smoothed.qweight_layout == plain.qweight_layout == (int8_engine or "packed")
    # what the layer computed before the fold (in fp32: x * s is fp32), back in the input's dtype
    expected = plain(x * smoothed.input_smoothing).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if activation == "dynamic":  # and one row alone quantizes like the same row in a batch
        batched = smoothed(torch.cat([x, x * 0.1]))
        torch.testing.assert_close(smoothed(x[:1]), batched[:1], rtol=1e-4, atol=1e-4)


# -- which int8 engine ----------------------------------------------------------------------------
@pytest.fixture
def engine_choice(monkeypatch):
    """``cpu_int8_engine()`` recomputed with the engines' availability and saturation given."""

    def choose(onednn=True, fbgemm=True, features=ZEN4, env=None):
        monkeypatch.setattr(kernels, "onednn_int8_available", lambda: onednn)
        monkeypatch.setattr(kernels, "fbgemm_int8_available", lambda: fbgemm)
        monkeypatch.setattr(kernels, "cpu_features", lambda: features)
        if env is None:
            monkeypatch.delenv(kernels.INT8_ENGINE_ENV, raising=False)
        else:
            monkeypatch.setenv(kernels.INT8_ENGINE_ENV, env)
        kernels.cpu_int8_engine.cache_clear()
        try:
            return kernels.cpu_int8_engine()
        finally:
            kernels.cpu_int8_engine.cache_clear()

    yield choose
    kernels.cpu_int8_engine.cache_clear()


def test_int8_engine_follows_the_cpu(engine_choice):
    assert engine_choice(features=XEON_AMX) == "onednn"  # AMX tiles: twice fbgemm from 32 rows
    assert engine_choice(features=ZEN4) == "fbgemm"  # its single-row kernel is 1.5-2x oneDNN's
    assert engine_choice(features=AVX2_ONLY) == engine_choice(features=GENERIC) == "fbgemm"
    assert engine_choice(features=XEON_AMX, fbgemm=False) == engine_choice(fbgemm=False) == "onednn"
    assert engine_choice(features=XEON_AMX, onednn=False) == "fbgemm"
    assert engine_choice(onednn=False, fbgemm=False) is None  # _int_mm
    assert engine_choice(env="ONEDNN") == "onednn" and engine_choice(features=XEON_AMX, env="fbgemm") == "fbgemm"
    assert engine_choice(features=XEON_AMX, env=" auto ") == "onednn"


@pytest.mark.parametrize(
    ("env", "onednn", "fbgemm", "match"),
    [("mkl", True, True, "is not an int8 kernel"), ("fbgemm", True, False, "cannot run it")],
)
def test_int8_engine_refuses_what_it_cannot_use(engine_choice, env, onednn, fbgemm, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        engine_choice(onednn=onednn, fbgemm=fbgemm, env=env)
    assert kernels.INT8_ENGINE_ENV in info.value.suggestion


@pytest.mark.parametrize("activation", ["dynamic", "none", "static"])
def test_int8_engines_take_inputs_that_require_grad(int8_engine, activation):
    # a quantized layer inside a model being fine-tuned elsewhere: no gradient through the
    # integer kernels, the same output as without autograd
    torch.manual_seed(0)
    float_layer = nn.Linear(32, 16)
    qparams = (torch.tensor(0.05), torch.tensor(-3, dtype=torch.int32))
    config = LayerQuantConfig(bits=8, symmetric=True, activation=activation)
    layer = QuantizedLinear.from_float(float_layer, config, input_qparams=qparams if activation == "static" else None)
    x = torch.randn(3, 32)
    expected = layer(x)
    torch.testing.assert_close(layer(x.clone().requires_grad_()).detach(), expected, rtol=0, atol=0)
