"""mono_quant.core.schemes: the qparam maths, checked by properties and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mono_quant.api.exceptions import ConfigurationError, InputError
from mono_quant.core.schemes import (
    INT4_ASYMMETRIC,
    INT4_SYMMETRIC,
    INT8_ASYMMETRIC,
    INT8_SYMMETRIC,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    _quantize_block,
    choose_qparams,
    dequantize,
    dequantize_groups,
    dequantize_weight,
    group_bounds,
    pack_int4,
    quantize,
    quantize_weight,
    rtn_quantize_weight,
    sqnr,
    unpack_int4,
)

SPECS = [INT8_SYMMETRIC, INT8_ASYMMETRIC, INT4_SYMMETRIC, INT4_ASYMMETRIC]
SPEC_IDS = [spec.name for spec in SPECS]
# Relative slack for fp32 arithmetic in x / scale and (q - zp) * scale: far below one step.
FP32_SLACK = 1e-4

finite_floats = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)


def _matrices(max_rows: int = 6, max_cols: int = 64):
    shapes = st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))
    return hnp.arrays(np.float32, shapes, elements=finite_floats)


def _per_element(qparam: torch.Tensor, weight: torch.Tensor, granularity) -> torch.Tensor:
    """Expand a per-tensor / per-channel / per-group qparam to the weight's shape."""
    if isinstance(granularity, PerTensor):
        return qparam.expand(weight.shape)
    if isinstance(granularity, PerChannel):
        return qparam.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
    return qparam.repeat_interleave(granularity.group_size, dim=1)


def _assert_within_half_step(weight: torch.Tensor, spec: QuantSpec, granularity) -> None:
    qt = quantize_weight(weight, spec, granularity)
    error = (dequantize_weight(qt) - weight).abs()
    step = _per_element(qt.scale, weight, granularity)
    bound = step * 0.5 * (1 + FP32_SLACK) + weight.abs() * 1e-6
    worst = (error - bound).max().item()
    assert worst <= 0, f"{spec.name} {granularity}: error exceeds scale/2 by {worst}"


# -- the round-trip bound: |x - dequant(quant(x))| <= scale / 2 ------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=40, deadline=None)
@given(values=_matrices())
def test_round_trip_error_at_most_half_step_per_tensor(spec, values):
    _assert_within_half_step(torch.from_numpy(values), spec, PerTensor())


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=40, deadline=None)
@given(values=_matrices())
def test_round_trip_error_at_most_half_step_per_channel(spec, values):
    _assert_within_half_step(torch.from_numpy(values), spec, PerChannel(0))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=40, deadline=None)
@given(
    group_size=st.sampled_from([2, 4, 8, 16]),
    data=st.data(),
)
def test_round_trip_error_at_most_half_step_per_group(spec, group_size, data):
    rows = data.draw(st.integers(1, 5))
    groups = data.draw(st.integers(1, 4))
    values = data.draw(hnp.arrays(np.float32, (rows, groups * group_size), elements=finite_floats))
    _assert_within_half_step(torch.from_numpy(values), spec, PerGroup(group_size))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=60, deadline=None)
@given(
    bounds=st.tuples(
        st.floats(-1e6, 1e6, width=32, allow_subnormal=False), st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
    ),
    fractions=hnp.arrays(np.float32, 32, elements=st.floats(0, 1, width=32)),
)
def test_any_value_inside_the_chosen_range_is_within_half_step(spec, bounds, fractions):
    """choose_qparams on [lo, hi], then any x in [lo, hi] round-trips within scale / 2."""
    lo, hi = min(bounds), max(bounds)
    scale, zero_point = choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    x = torch.tensor(lo) + torch.from_numpy(fractions) * (hi - lo)
    x = x.clamp(lo, hi)
    x_hat = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point)
    bound = scale * 0.5 * (1 + FP32_SLACK) + x.abs() * 1e-6
    assert ((x_hat - x).abs() <= bound).all()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-1e6, 0, width=32, allow_subnormal=False), hi=st.floats(0, 1e6, width=32, allow_subnormal=False))
def test_zero_is_exactly_representable(spec, lo, hi):
    scale, zero_point = choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    q = quantize(torch.zeros(3), scale, zero_point, spec)
    assert torch.equal(dequantize(q, scale, zero_point), torch.zeros(3))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=30, deadline=None)
@given(values=_matrices())
def test_zeros_inside_a_weight_stay_exact(spec, values):
    weight = torch.from_numpy(values)
    weight[:, ::3] = 0.0
    for granularity in (PerTensor(), PerChannel(0)):
        restored = dequantize_weight(quantize_weight(weight, spec, granularity))
        assert torch.equal(restored[:, ::3], torch.zeros_like(weight[:, ::3]))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_quantized_values_stay_on_the_grid(spec):
    torch.manual_seed(0)
    qt = quantize_weight(torch.randn(8, 64) * 5, spec, PerGroup(16))
    assert qt.qdata.dtype == spec.storage_dtype
    assert int(qt.qdata.min()) >= spec.qmin and int(qt.qdata.max()) <= spec.qmax


# -- int4 packing -----------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(
    values=hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 16).map(lambda n: 2 * n)),
        elements=st.integers(0, 15),
    )
)
def test_int4_pack_unpack_is_identity(values):
    q = torch.from_numpy(values)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.shape == (q.shape[0], q.shape[1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_pack_layout_low_nibble_first():
    assert pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


def _pack_by_gather(q: torch.Tensor) -> torch.Tensor:
    """The packing rule written out: byte i = element 2i | element 2i+1 << 4."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda q: q, id="contiguous"),
        pytest.param(lambda q: q[:, 2:], id="column_slice"),
        pytest.param(lambda q: q.t().contiguous().t()[:, :8], id="transposed"),
        pytest.param(lambda q: q.reshape(-1)[1:41], id="odd_storage_offset"),
        pytest.param(lambda q: q.to(torch.int32), id="int32_input"),
        pytest.param(lambda q: q[:0], id="empty"),
    ],
)
def test_int4_pack_matches_the_byte_rule_for_any_layout(view):
    # pack_int4 reads byte pairs as int16 words: equal to the gather it replaces, whatever the
    # input's strides, offset or dtype
    q = view(torch.randint(0, 16, (6, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(pack_int4(q), _pack_by_gather(q))


@pytest.mark.parametrize(
    ("shape", "granularity", "steps"),
    [
        pytest.param((96, 256), PerGroup(128), 0, id="groups"),
        pytest.param((96, 256), PerGroup(32), 8, id="groups_clip_search"),
        pytest.param((40, 64), PerChannel(), 0, id="per_channel"),
        pytest.param((8, 320), PerGroup(128), 0, id="partial_last_group"),
        pytest.param((8, 4), PerGroup(128), 0, id="narrower_than_a_group"),
        pytest.param((6, 16), PerTensor(), 0, id="per_tensor"),
        pytest.param((4, 2, 3, 6), PerChannel(), 0, id="conv_weight"),
    ],
)
@pytest.mark.parametrize("spec", [INT4_ASYMMETRIC, INT4_SYMMETRIC], ids=lambda s: s.name)
def test_packed_int4_equals_packing_the_codes(monkeypatch, shape, granularity, steps, spec):
    # packed=True packs each block as it is rounded (or, where the loop cannot, once at the end):
    # the same bytes and qparams as packing the unpacked result, over several blocks too
    monkeypatch.setattr("mono_quant.core.schemes._CPU_BLOCK_ELEMENTS", 1024)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    plain = quantize_weight(weight, spec, granularity, steps)
    packed = quantize_weight(weight, spec, granularity, steps, packed=True)
    assert packed.packed and not plain.packed
    assert packed.shape == plain.shape == weight.shape
    assert torch.equal(packed.qdata, pack_int4(plain.qdata))
    assert torch.equal(packed.unpacked(), plain.qdata)
    assert torch.equal(packed.scale, plain.scale)
    assert (packed.zero_point is None) == (plain.zero_point is None)
    if plain.zero_point is not None:
        assert torch.equal(packed.zero_point, plain.zero_point)
    assert torch.equal(dequantize_weight(packed), dequantize_weight(plain))


def test_packed_is_ignored_by_int8_specs():
    weight = torch.randn(8, 32)
    qt = quantize_weight(weight, INT8_SYMMETRIC, PerChannel(), packed=True)
    assert not qt.packed and qt.qdata.shape == (8, 32)


def test_int4_pack_odd_width_raises_input_error():
    with pytest.raises(InputError, match="even last dimension") as info:
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    assert "Suggestion:" in str(info.value)


# -- choose_qparams edge cases ----------------------------------------------------------------------
def test_choose_qparams_documented_example():
    scale, zero_point = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), INT8_ASYMMETRIC)
    assert scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    assert zero_point.item() == -64
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_choose_qparams_all_zero_gives_finite_scale_and_exact_zeros(spec):
    scale, zero_point = choose_qparams(torch.zeros(4), torch.zeros(4), spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    qt = quantize_weight(torch.zeros(4, 8), spec, PerChannel(0))
    assert torch.equal(dequantize_weight(qt), torch.zeros(4, 8))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("value", [-3.5, 2.0, 1e-3], ids=["negative", "positive", "small"])
def test_constant_tensor_round_trips_within_half_step(spec, value):
    weight = torch.full((3, 16), value)
    qt = quantize_weight(weight, spec, PerChannel(0))
    error = (dequantize_weight(qt) - weight).abs().max().item()
    assert error <= qt.scale.max().item() * 0.5 * (1 + FP32_SLACK)
    # the range is widened to contain zero, so the constant sits at the edge of the grid
    assert (qt.scale > 0).all()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("magnitude", [1e30, 3e38], ids=["1e30", "near-fp32-max"])
def test_huge_values_give_finite_qparams(spec, magnitude):
    lo, hi = torch.tensor(-magnitude), torch.tensor(magnitude)
    scale, zero_point = choose_qparams(lo, hi, spec)
    assert torch.isfinite(scale) and scale > 0
    x = torch.tensor([-magnitude, -magnitude / 3, 0.0, magnitude / 7, magnitude])
    x_hat = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point)
    assert torch.isfinite(x_hat).all()
    assert ((x_hat - x).abs() <= scale * 0.5 * (1 + FP32_SLACK)).all()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_tiny_values_do_not_produce_nan(spec):
    weight = torch.tensor([[1e-30, -2e-30, 0.0, 3e-30]])
    qt = quantize_weight(weight, spec, PerChannel(0))
    restored = dequantize_weight(qt)
    assert torch.isfinite(qt.scale).all() and torch.isfinite(restored).all()
    assert (restored - weight).abs().max().item() <= qt.scale.item()


def test_symmetric_int8_grid_is_symmetric_and_has_no_zero_point():
    assert (INT8_SYMMETRIC.qmin, INT8_SYMMETRIC.qmax) == (-127, 127)
    qt = quantize_weight(torch.tensor([[-1.0, 0.5, 1.0]]), INT8_SYMMETRIC, PerChannel(0))
    assert qt.zero_point is None
    assert qt.qdata.tolist() == [[-127, 64, 127]]


def test_symmetric_int4_is_centred_on_eight():
    assert (INT4_SYMMETRIC.qmin, INT4_SYMMETRIC.qmax, INT4_SYMMETRIC.symmetric_zero_point) == (1, 15, 8)
    qt = quantize_weight(torch.tensor([[-7.0, 0.0, 7.0, 3.0]]), INT4_SYMMETRIC, PerChannel(0))
    assert qt.qdata.tolist() == [[1, 8, 15, 11]]
    assert qt.zero_point.tolist() == [8]


# -- quantize_weight against an independent reference -------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_per_channel_matches_row_by_row_reference(spec):
    torch.manual_seed(1)
    weight = torch.randn(70, 24) * torch.linspace(0.1, 10, 70).unsqueeze(1)  # more rows than one CPU block
    qt = quantize_weight(weight, spec, PerChannel(0))
    assert qt.scale.shape == (70,)
    for row in (0, 33, 69):
        scale, zero_point = choose_qparams(weight[row].min(), weight[row].max(), spec)
        zp = None if qt.zero_point is None else zero_point
        expected = quantize(weight[row], scale, zp, spec)
        assert torch.equal(qt.qdata[row], expected)
        assert qt.scale[row].item() == scale.item()


def test_per_group_matches_group_by_group_reference():
    torch.manual_seed(2)
    weight = torch.randn(4, 64)
    qt = quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(16))
    assert qt.scale.shape == (4, 4) and qt.zero_point.shape == (4, 4)
    for row, group in ((0, 0), (3, 2), (2, 3)):
        block = weight[row, group * 16 : (group + 1) * 16]
        scale, zero_point = choose_qparams(block.min(), block.max(), INT4_ASYMMETRIC)
        assert torch.equal(
            qt.qdata[row, group * 16 : (group + 1) * 16], quantize(block, scale, zero_point, INT4_ASYMMETRIC)
        )


def test_per_channel_on_another_axis():
    torch.manual_seed(3)
    weight = torch.randn(6, 5) * torch.arange(1, 6)  # columns with very different ranges
    qt = quantize_weight(weight, INT8_SYMMETRIC, PerChannel(axis=1))
    assert qt.scale.shape == (5,) and qt.qdata.shape == (6, 5)
    expected = weight.abs().amax(dim=0) / 127
    torch.testing.assert_close(qt.scale, expected)
    assert sqnr(weight, dequantize_weight(qt)) > 35


def test_quantize_weight_leaves_input_unchanged_and_takes_non_contiguous():
    torch.manual_seed(4)
    base = torch.randn(32, 16)
    weight = base.t()  # non-contiguous
    before = weight.clone()
    qt = quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(16), clip_search_steps=8)
    assert torch.equal(weight, before)
    assert sqnr(weight, dequantize_weight(qt)) > 15


def test_more_bits_and_smaller_groups_are_more_accurate():
    torch.manual_seed(5)
    weight = torch.randn(64, 256)
    int8 = sqnr(weight, dequantize_weight(quantize_weight(weight, INT8_SYMMETRIC)))
    g128 = sqnr(weight, dequantize_weight(quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(128))))
    g32 = sqnr(weight, dequantize_weight(quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(32))))
    assert int8 > 38  # about 6 dB per bit above int4
    assert int8 > g32 > g128 > 14


# -- clipping search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT4_ASYMMETRIC, INT4_SYMMETRIC, INT8_ASYMMETRIC], ids=lambda s: s.name)
@settings(max_examples=25, deadline=None)
@given(values=hnp.arrays(np.float32, (4, 32), elements=finite_floats))
def test_clip_search_never_worse_than_min_max(spec, values):
    weight = torch.from_numpy(values)
    plain = dequantize_weight(quantize_weight(weight, spec, PerGroup(16)))
    searched = dequantize_weight(quantize_weight(weight, spec, PerGroup(16), clip_search_steps=12))
    group_mse = lambda x: (x - weight).double().pow(2).view(4, 2, 16).sum(-1)  # noqa: E731
    assert (group_mse(searched) <= group_mse(plain) * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("distribution", ["normal", "student-t"])
def test_clip_search_improves_int4_sqnr(distribution):
    torch.manual_seed(6)
    if distribution == "normal":
        weight = torch.randn(64, 256)
    else:
        weight = torch.distributions.StudentT(3.0).sample((64, 256))
    plain = sqnr(weight, dequantize_weight(quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(128))))
    searched = sqnr(weight, dequantize_weight(quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(128), 16)))
    assert searched > plain + 0.3  # measured: +0.45 dB (normal), +0.40 dB (Student-t, 3 dof)


# -- invalid configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 16, 32])
def test_unsupported_bits_raise_configuration_error(bits):
    with pytest.raises(ConfigurationError, match=f"bits={bits}") as info:
        QuantSpec(bits, True)
    assert "bits=8" in info.value.suggestion and info.value.suggestion in str(info.value)


@pytest.mark.parametrize("group_size", [0, 1, -32, 2.0, True])
def test_bad_group_size_raises_configuration_error(group_size):
    with pytest.raises(ConfigurationError, match="group_size must be an integer >= 2") as info:
        PerGroup(group_size)
    assert "group_size=" in info.value.suggestion and info.value.suggestion in str(info.value)


@pytest.mark.parametrize("steps", [0, 8])
def test_group_size_not_dividing_the_input_gives_a_partial_last_group(steps):
    torch.manual_seed(0)
    weight = torch.randn(4, 48)
    qt = quantize_weight(weight, INT4_ASYMMETRIC, PerGroup(32), steps)
    assert qt.scale.shape == (4, 2) and qt.zero_point.shape == (4, 2)
    # the partial group is quantized on its own: the same as quantizing its 16 columns alone
    tail = quantize_weight(weight[:, 32:], INT4_ASYMMETRIC, PerGroup(16), steps)
    assert torch.equal(qt.qdata[:, 32:], tail.qdata) and torch.equal(qt.scale[:, 1:], tail.scale)
    head = quantize_weight(weight[:, :32], INT4_ASYMMETRIC, PerGroup(32), steps)
    assert torch.equal(dequantize_weight(qt)[:, :32], dequantize_weight(head))
    assert sqnr(weight, dequantize_weight(qt)) > 15


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("steps", [0, 8])
def test_blocks_written_into_the_output_equal_the_pure_block_function(spec, steps):
    # quantize_weight's CPU path rounds in a reused buffer and casts into the output; the pure
    # form (what a compiled GPU kernel runs) must give the same integers and qparams
    torch.manual_seed(4)
    weight = torch.randn(300, 256) * torch.linspace(0.05, 4, 300).unsqueeze(1)  # several blocks
    granularity = PerGroup(64) if spec.bits == 4 else PerChannel()
    qt = quantize_weight(weight, spec, granularity, steps)
    group = 64 if spec.bits == 4 else 256
    q, scale, zero_point = _quantize_block(weight.view(300, 256 // group, group), spec, steps)
    assert torch.equal(qt.qdata, q.view(300, 256))
    assert torch.equal(qt.scale.view(300, -1), scale)
    if qt.zero_point is not None:
        assert torch.equal(qt.zero_point.view(300, -1), zero_point)


@pytest.mark.parametrize("group_size", [None, 32, 48, 128], ids=lambda g: f"g{g}")
def test_rtn_quantize_weight_is_quantize_weight_named_by_group_size(group_size):
    torch.manual_seed(5)
    weight = torch.randn(8, 80)  # 80 = 2 x 32 + 16, 48 + 32, and narrower than one group of 128
    qt = rtn_quantize_weight(weight, INT4_ASYMMETRIC, group_size)
    granularity = PerChannel() if group_size is None else PerGroup(group_size)
    expected = quantize_weight(weight, INT4_ASYMMETRIC, granularity)
    assert torch.equal(qt.qdata, expected.qdata) and torch.equal(qt.scale, expected.scale)
    groups = 1 if group_size is None else len(group_bounds(80, group_size))
    assert qt.scale.numel() == 8 * groups
    assert sqnr(weight, dequantize_groups(qt)) > 15


def test_group_bounds_cover_the_columns_once_with_a_partial_tail():
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(100, None) == [(0, 100)]
    assert group_bounds(100, 128) == [(0, 100)]


def test_dequantize_groups_takes_float_zero_points_and_partial_groups():
    # HQQ's form: float zero points, per group with a partial last group
    torch.manual_seed(6)
    q = torch.randint(0, 16, (3, 40), dtype=torch.uint8)
    scale, zero = torch.rand(3, 2) + 0.1, torch.rand(3, 2) * 15
    qt = rtn_quantize_weight(torch.randn(3, 40), INT4_ASYMMETRIC, 32)
    qt.qdata, qt.scale, qt.zero_point = q, scale, zero
    expected = (q.float() - zero.repeat_interleave(32, dim=1)[:, :40]) * scale.repeat_interleave(32, dim=1)[:, :40]
    assert torch.equal(dequantize_groups(qt), expected)
    assert dequantize_groups is dequantize_weight


def test_group_wise_needs_a_2d_weight():
    with pytest.raises(InputError, match="2-D weight"):
        quantize_weight(torch.randn(4, 8, 3, 3), INT4_ASYMMETRIC, PerGroup(8))


def test_integer_weight_is_refused():
    with pytest.raises(InputError, match="floating-point"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int8), INT8_SYMMETRIC)


# -- sqnr ---------------------------------------------------------------------------------------------
def test_sqnr_values():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert sqnr(x, x) == math.inf
    assert sqnr(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise is 10% of the signal
    assert sqnr(torch.zeros(3), x) == -math.inf
