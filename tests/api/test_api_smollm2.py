"""SmolLM2-135M-Instruct (a Llama with tied embeddings, hidden size 576) through every mode:
all 210 decoder Linears quantized, the model runs, saves, reloads bit-exact with the tie intact;
int4 perplexity no worse than plain round-to-nearest on the same windows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mono_quant import load_quantized, quantize
from mono_quant.modules import QuantizedLinear
from mono_quant.testing import perplexity

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

DECODER_LINEARS = 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers


def _rtn_int4(weight: torch.Tensor, group: int = 128) -> torch.Tensor:
    """The reference to beat: plain round-to-nearest, asymmetric min/max per group of ``group``
    input features, the last group partial (576 = 4 x 128 + 64), written out here on purpose."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], group):
        block = weight[:, start : start + group]
        lo = block.amin(dim=1, keepdim=True).clamp(max=0)
        hi = block.amax(dim=1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.clamp(torch.round(block / scale) + zero, 0, 15)
        out[:, start : start + group] = (q - zero) * scale
    return out


@pytest.fixture(scope="module")
def rtn_perplexity(smollm2, smollm2_eval_windows):
    model = copy.deepcopy(smollm2[0])
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model.layers."):
                module.weight.copy_(_rtn_int4(module.weight))
    return perplexity(model, smollm2_eval_windows[:2])


@pytest.fixture(scope="module")
def fp32_perplexity(smollm2, smollm2_eval_windows):
    return perplexity(smollm2[0], smollm2_eval_windows[:2])


def _decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, QuantizedLinear)]


MODES = {
    "int8-dynamic": {"bits": 8, "dynamic": True},
    "int8-weight-only": {"bits": 8, "weight_only": True},
    "int8-static": {"bits": 8},
    "int4-g128": {"bits": 4, "group_size": 128},
    "int4-g32": {"bits": 4, "group_size": 32},
    "fp16": {"bits": 16},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_quantizes_all_decoder_linears_runs_saves_and_reloads(
    smollm2, smollm2_eval_windows, smollm2_calibration_windows, tmp_path, mode
):
    model, _ = smollm2
    kwargs = dict(MODES[mode])
    if mode == "int8-static":
        kwargs["calibration_data"] = [{"input_ids": w.unsqueeze(0)} for w in smollm2_calibration_windows[:2, :256]]
    result = quantize(model, **kwargs)
    assert result, result.errors
    qmodel = result.model
    ids = smollm2_eval_windows[:1, :128]
    with torch.inference_mode():
        logits = qmodel(input_ids=ids).logits
        reference = model(input_ids=ids).logits
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    # static int8 has one activation scale per tensor: Llama outliers cost it most (SmoothQuant helps)
    assert cosine > {"int8-static": 0.9}.get(mode, 0.95 if mode.startswith("int4") else 0.99), cosine
    if mode == "fp16":
        assert len(result.info.selected_layers) >= DECODER_LINEARS
        return
    assert len(_decoder_linears(qmodel)) == DECODER_LINEARS, result.info.skip_reasons
    assert result.info.skip_reasons == {}
    head, embed = qmodel.lm_head, qmodel.model.embed_tokens
    assert head.config.bits == 8  # int4 runs keep the output head at 8 bits
    assert head.tied_to == "model.embed_tokens"
    assert torch.equal(head.dequantized_weight(), embed.dequantized_weight())

    path = result.save(tmp_path / "smollm2.safetensors")
    from transformers import AutoModelForCausalLM

    restored = load_quantized(path, AutoModelForCausalLM.from_config(model.config))
    assert torch.equal(restored.lm_head.dequantized_weight(), restored.model.embed_tokens.dequantized_weight())
    with torch.inference_mode():
        assert torch.equal(restored(input_ids=ids).logits, logits)


def test_int4_g128_data_free_default_closes_a_quarter_of_round_to_nearests_gap(
    smollm2, smollm2_eval_windows, rtn_perplexity, fp32_perplexity
):
    """The data-free default is HQQ weighted by input mean squares measured on random token ids
    (issue 12's goal: >= 25% of plain round-to-nearest's gap to fp32). Measured 50% on 4
    windows (bench/accuracy_algorithms.py: 45% on 8); method='rtn' stays at RTN's level."""
    result = quantize(smollm2[0], bits=4, group_size=128)
    assert result, result.errors
    assert result.info.metrics["statistics"]["source"] == "random tokens"
    methods = {c["method"] for n, c in result.info.layer_configs.items() if n.startswith("model.layers.")}
    assert methods == {"hqq"}
    ours = perplexity(result.model, smollm2_eval_windows[:2])
    closed = (rtn_perplexity - ours) / (rtn_perplexity - fp32_perplexity)
    print(f"fp32 {fp32_perplexity:.3f}  rtn {rtn_perplexity:.3f}  ours {ours:.3f}  gap closed {closed:.0%}")
    assert closed >= 0.25, (ours, rtn_perplexity, fp32_perplexity)

    plain = quantize(smollm2[0], bits=4, group_size=128, method="rtn")
    rtn = perplexity(plain.model, smollm2_eval_windows[:2])
    # min/max round-to-nearest (plus an int8 lm_head): equal up to kernel rounding, which differs
    # across CPUs (AMX, AVX-512): 0.5% of slack, no more.
    assert rtn <= rtn_perplexity * 1.005, (rtn, rtn_perplexity)


def _perplexity_draws(model, windows, draws: int = 2, layer: int = 1) -> list[float]:
    """Perplexity of ``model`` as it is, then with ``draws`` perturbations of its decoder layer
    ``layer``'s input by a relative 1e-7 (one ulp of fp32), each a fresh seed.

    A model with per-token int8 activations is chaotic at this scale: one flipped rounding moves
    the next layers' values by a whole step and flips more, so after a few layers the rounding
    noise is a new draw. Measured on SmolLM2 int8 dynamic: 1e-7 at layer 15's input changes the
    per-token loss by 0.047 nats on average (2 windows; fp32 under the same noise: unchanged to
    1e-4 in perplexity) and the perplexity by +0.2% to +0.5%; at layer 1 (8 windows) +0.02% to
    +0.4%. Different CPU kinds round a few fp32 ulps differently, so
    each kind sees one such draw (AVX-512: +0.66%, AVX2: +1.16% on the same quantized file).
    """
    block = model.model.layers[layer]
    seed: list[int | None] = [None]

    def perturb(module, args, kwargs):
        if seed[0] is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed[0]))
        hidden = hidden * (1 + 1e-7 * noise)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = block.register_forward_pre_hook(perturb, with_kwargs=True)
    try:
        values = []
        for draw in [None, *range(1, draws + 1)]:
            seed[0] = draw
            values.append(perplexity(model, windows))
        return values
    finally:
        handle.remove()


@pytest.mark.timeout(1800)  # the per-group alpha search: a few minutes quiet, far more on a loaded machine
def test_int8_dynamic_with_calibration_text_stays_near_fp32(
    smollm2, smollm2_eval_windows, smollm2_calibration_windows, fp32_perplexity
):
    """SmoothQuant (an alpha per group chosen on the calibration activations: the default with
    calibration data) from text the evaluation never sees, judged by the median of three draws of
    the rounding noise (:func:`_perplexity_draws`), the same on every CPU kind.

    Issue 12's goal is 1%, met since each token gets its own zero point (the default). Measured
    (Zen 4): these 2 windows, draws +0.94%, +0.71%, +0.73% (median +0.73%; with our rounding
    instead of fbgemm's, session 14: +0.99/+0.60/+0.66%; symmetric tokens: median ~+1.1%); 8
    windows +0.62% as quantized (symmetric +1.19%, bench/RESULTS.md)."""
    calibration = [{"input_ids": w.unsqueeze(0)} for w in smollm2_calibration_windows]
    result = quantize(smollm2[0], bits=8, dynamic=True, calibration_data=calibration)
    assert result.info.metrics["smoothing"]["per_group"] is True
    assert result.model.model.layers[0].mlp.down_proj.config.smoothed_input is False  # folded into up_proj
    draws = _perplexity_draws(result.model, smollm2_eval_windows[:2])
    ours = sorted(draws)[1]
    print(f"fp32 {fp32_perplexity:.3f}  int8 dynamic + smoothing {[round(d, 3) for d in draws]}")
    assert ours <= fp32_perplexity * 1.01, (draws, fp32_perplexity)


@pytest.mark.timeout(1800)
def test_int8_dynamic_with_rotation_and_calibration_is_within_one_percent(
    smollm2, smollm2_eval_windows, smollm2_calibration_windows, fp32_perplexity
):
    """Issue 12's int8 dynamic goal, met with ``rotation=True`` (the residual stream rotated,
    then SmoothQuant per group as above), judged by the median of five draws of the rounding noise
    (a CPU kind draws its own: a median of five moves less than one). Measured on 8 windows (Zen 3):
    +0.52% as it is (the same without rotation: +1.19%; five other rotations +0.42% to +1.17%, mean
    +0.81%); on these 2 windows five draws +0.10% to +0.66%, median +0.21%."""
    calibration = [{"input_ids": w.unsqueeze(0)} for w in smollm2_calibration_windows]
    result = quantize(smollm2[0], bits=8, dynamic=True, rotation=True, calibration_data=calibration)
    assert result, result.errors
    assert result.info.metrics["rotation"]["untied_output_head"] == 49152 * 576
    assert len(_decoder_linears(result.model)) == DECODER_LINEARS
    draws = _perplexity_draws(result.model, smollm2_eval_windows[:2], draws=4)
    ours = sorted(draws)[2]
    print(f"fp32 {fp32_perplexity:.3f}  int8 dynamic + rotation + smoothing {[round(d, 3) for d in draws]}")
    assert ours <= fp32_perplexity * 1.01, (draws, fp32_perplexity)


@pytest.mark.timeout(1200)  # ~1 min on a quiet machine; a loaded 2-core one took > 10
def test_gptq_int4_g128_closes_most_of_round_to_nearests_gap(
    smollm2, smollm2_eval_windows, smollm2_calibration_windows, rtn_perplexity, fp32_perplexity
):
    """GPTQ on 16 x 512 calibration tokens, act-order + sample dampening (the defaults).
    Measured on these 2 windows: 83% of the gap (issue 12's goal: 50%); bench/accuracy_algorithms.py
    on 8 windows: 64% (natural order, 1% dampening: 37%)."""
    calibration = [{"input_ids": w.unsqueeze(0)} for w in smollm2_calibration_windows]
    result = quantize(smollm2[0], bits=4, group_size=128, method="gptq", calibration_data=calibration)
    assert result, result.errors
    ours = perplexity(result.model, smollm2_eval_windows[:2])
    closed = (rtn_perplexity - ours) / (rtn_perplexity - fp32_perplexity)
    print(f"fp32 {fp32_perplexity:.3f}  rtn {rtn_perplexity:.3f}  gptq {ours:.3f}  gap closed {closed:.0%}")
    assert closed >= 0.70
