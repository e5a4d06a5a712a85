"""The matmul kernels behind the quantized layers, against plain float maths."""

from __future__ import annotations

import pytest
import torch

from mono_quant.modules.kernels import int8_linear, int_mm_supported, quantize_per_token


@pytest.fixture
def x2d() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(9, 40) * torch.logspace(-3, 3, 9).unsqueeze(1)  # rows of very different scale


def test_one_term_is_per_row_symmetric_int8(x2d):
    q, scale = quantize_per_token(x2d, terms=1)
    assert q.dtype == torch.int8 and q.shape == x2d.shape and scale.shape == (9, 1)
    torch.testing.assert_close(scale, x2d.abs().amax(dim=1, keepdim=True) / 127)
    error = (q.float() * scale - x2d).abs()
    assert (error <= scale * 0.5 * (1 + 1e-5)).all()


def test_two_terms_reach_about_sixteen_bits(x2d):
    q, scale = quantize_per_token(x2d, terms=2)
    assert q.shape == (18, 40)
    restored = (q[:9].float() + q[9:].float() / 254) * scale
    error = (restored - x2d).abs()
    # half a step of the second term, plus fp32 rounding of values up to 127 (~1.5e-5 of a step)
    assert (error <= scale * (0.5 / 254 + 3e-5)).all()


def test_all_zero_rows_stay_zero():
    q, scale = quantize_per_token(torch.zeros(3, 8), terms=2)
    assert torch.isfinite(scale).all() and not q.any()


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("with_zero_point", [False, True], ids=["sym", "asym"])
def test_int8_linear_matches_float_maths(x2d, terms, with_zero_point):
    torch.manual_seed(1)
    weight = torch.randint(-128, 128, (24, 40), dtype=torch.int8)
    scale = torch.rand(24) * 0.01 + 0.001
    zero_point = torch.randint(-20, 20, (24,), dtype=torch.int32) if with_zero_point else None
    bias = torch.randn(24)
    out = int8_linear(x2d, weight.t(), scale, zero_point, bias, terms)
    q, act_scale = quantize_per_token(x2d, terms)
    x_hat = q[:9].float() if terms == 1 else q[:9].float() + q[9:].float() / 254
    w_hat = (weight.float() - (0 if zero_point is None else zero_point.float().unsqueeze(1))) * scale.unsqueeze(1)
    expected = (x_hat * act_scale) @ w_hat.t() + bias
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


def test_int_mm_shape_rules():
    assert int_mm_supported(1, 3, 5, torch.device("cpu"))
    assert int_mm_supported(17, 64, 64, torch.device("cuda"))
    assert not int_mm_supported(16, 64, 64, torch.device("cuda"))  # CUDA needs M > 16
    assert not int_mm_supported(32, 60, 64, torch.device("cuda"))  # and K, N multiples of 8
    assert not int_mm_supported(32, 64, 10, torch.device("cuda"))
    assert not int_mm_supported(32, 64, 64, torch.device("meta"))


@pytest.mark.parametrize("offset, dtype", [(0, torch.int8), (128, torch.uint8)])
def test_rounding_to_codes_is_round_half_to_even_then_shift(offset, dtype):
    from mono_quant.modules.kernels import _round_to_codes

    ties = torch.arange(-127, 127).float() + 0.5  # every tie in range: half to even, like torch.round
    near = torch.tensor([-127.0, 127.0, 0.0, -0.0, 0.49999997, -0.49999997, 126.50001, -126.50001, 1e-30])
    values = torch.cat([ties, near, torch.empty(4000).uniform_(-127, 127)])
    codes = _round_to_codes(values.clone(), offset, dtype)
    expected = (torch.round(values) + offset).to(torch.int32)
    assert codes.dtype == dtype
    assert torch.equal(codes.to(torch.int32), expected)


def test_one_term_codes_are_the_rounded_scaled_rows(x2d):
    q, scale = quantize_per_token(x2d, terms=1)
    amax = torch.maximum(x2d.amin(dim=1, keepdim=True).neg(), x2d.amax(dim=1, keepdim=True))
    assert torch.equal(q, torch.round(x2d * (127.0 / amax)).to(torch.int8))
    shifted, _ = quantize_per_token(x2d, terms=1, offset=128, dtype=torch.uint8)
    assert torch.equal(shifted.to(torch.int32) - 128, q.to(torch.int32))
