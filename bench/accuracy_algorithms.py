"""Accuracy of the algorithms (RTN, HQQ, GPTQ, SmoothQuant) on real models, fake-quantized.

Weights are replaced by their dequantized values (weights only); "int8 dynamic" cases also
fake-quantize every Linear's input per token (symmetric int8, the numerics of
``modules.kernels.quantize_per_token``, i.e. ``activation_scheme="symmetric"``; the
``*_asym_tokens*`` cases give each token a zero point, the library's default since session 14)
with a forward pre-hook, after dividing it by the smoothing input scale where one could not be
folded.

* MiniLM (all-MiniLM-L6-v2): mean cosine (and min) of the sentence embeddings of
  ``mono_quant.testing.SENTENCES`` vs fp32; calibration (GPTQ, smoothing) on the 64 different
  sentences of ``CALIBRATION_SENTENCES`` below. Every Linear quantized.
* SmolLM2-135M: perplexity on 512-token windows of ``eval_text()``; calibration on 16 x 512
  tokens of ``calibration_text()``. Every decoder Linear quantized; the tied embedding /
  lm_head stays fp32 (the library keeps it at 8 bits in int4 runs). K = 576 is not a multiple
  of 128: the last group holds 64 columns. ``gap_closed`` = share of plain min/max RTN's
  perplexity gap to fp32 (the data-free default) that a case removes.

Usage: ``python bench/accuracy_algorithms.py [--models minilm,smollm2] [--eval-windows 8] [--quick]``
(``--quick``: MiniLM only, fewer cases.) One JSON line per case on stdout.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from _common import emit, emit_error, log, machine
from torch import nn

from mono_quant.core.algorithms import (
    apply_smoothing,
    collect_activation_absmax,
    collect_activation_samples,
    collect_input_mean_squares,
    dequantize_groups,
    gptq_quantize_model,
    hqq_quantize_weight,
    rotate_residual_stream,
    rtn_quantize_weight,
    smoothing_plan,
    synthetic_token_batches,
)
from mono_quant.core.schemes import INT4_ASYMMETRIC, INT8_SYMMETRIC

BENCH = "accuracy_algorithms"

# Calibration text for MiniLM, disjoint from mono_quant.testing.SENTENCES (the evaluation set).
CALIBRATION_SENTENCES = [
    "The library closes early on public holidays.",
    "A sudden frost damaged most of the apple blossoms.",
    "Please restart the router before calling support.",
    "The senator defended the bill in a long speech.",
    "Our cat refuses to eat anything but salmon.",
    "The spacecraft entered orbit around Mars on Tuesday.",
    "Whisk the eggs with a pinch of salt and pepper.",
    "The database migration took longer than planned.",
    "Tickets for the concert sold out within minutes.",
    "He repaired the old bicycle with spare parts.",
    "Rainforests host more than half of all species.",
    "The invoice was paid two weeks after the deadline.",
    "Where can I find the nearest pharmacy?",
    "The orchestra tuned their instruments before the show.",
    "Clouds gathered over the hills by late afternoon.",
    "The compiler reported three warnings and no errors.",
    "She adopted two kittens from the local shelter.",
    "The treaty was signed by twelve nations.",
    "Fresh bread smells wonderful in the morning.",
    "The goalkeeper saved a penalty in the final minute.",
    "Electric cars are becoming cheaper every year.",
    "The professor postponed the exam until next month.",
    "Sand dunes shift slowly with the desert winds.",
    "My phone screen cracked when it fell on the stairs.",
    "The hotel offers a free breakfast buffet.",
    "Voters lined up for hours outside the polling station.",
    "The algorithm sorts the list in linear time.",
    "A lighthouse guided the ships through the fog.",
    "Could you send me the slides from the presentation?",
    "The garden is full of roses and lavender in June.",
    "Inflation eased slightly in the third quarter.",
    "The kids built a snowman in the front yard.",
    "The new bridge will shorten the commute by ten minutes.",
    "Wolves hunt in packs across the northern forests.",
    "The password must contain at least twelve characters.",
    "He practiced the piano for two hours every evening.",
    "The volcano erupted after centuries of silence.",
    "Our quarterly sales target was exceeded again.",
    "The nurse checked the patient's temperature.",
    "A thick fog delayed flights at the airport.",
    "The startup hired twenty engineers this spring.",
    "Coral reefs are sensitive to warming oceans.",
    "I left my keys on the kitchen counter.",
    "The documentary explores the history of jazz.",
    "Farmers harvested the wheat before the storm arrived.",
    "The printer on the third floor is out of paper.",
    "Maple syrup is made from the sap of trees.",
    "The jury reached a verdict after two days.",
    "She translated the novel from Spanish into English.",
    "The telescope captured images of a distant galaxy.",
    "We hiked along the coast until the tide came in.",
    "The app crashes whenever I open the settings page.",
    "Owls can turn their heads almost all the way around.",
    "The city council approved the new bike lanes.",
    "Lemon juice adds a bright flavor to the sauce.",
    "The runner broke the national record last weekend.",
    "Backups should be tested regularly to be useful.",
    "The castle was built in the twelfth century.",
    "A rainbow appeared after the afternoon shower.",
    "The manager praised the team for their hard work.",
    "Honey never spoils if it is stored properly.",
    "The bus was crowded with students this morning.",
    "Gravity keeps the planets in orbit around the sun.",
    "The workshop teaches beginners how to code.",
]


# -- fake quantization -------------------------------------------------------------------------


def linear_names(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in exclude]


def per_token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per token (``amax / 127``), as the dynamic int8 kernels quantize."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = amax / 127.0
    return torch.round(x / scale).clamp(-127, 127) * scale


def per_token_fake_quant_asymmetric(x: torch.Tensor) -> torch.Tensor:
    """Each token on its own ``[min(x, 0), max(x, 0)]`` with a zero point (256 levels), as
    ``modules.kernels.quantize_per_token_asymmetric`` (the library's dynamic default)."""
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / 255.0
    zero_point = torch.round(-low / scale)
    return (torch.round(x / scale) + zero_point).clamp(0, 255).sub(zero_point) * scale


def install_activation_quant(
    model: nn.Module, names: list[str], input_scales: dict[str, torch.Tensor], asymmetric: bool = False
) -> list:
    modules = dict(model.named_modules())
    fake_quant = per_token_fake_quant_asymmetric if asymmetric else per_token_fake_quant
    handles = []
    for name in names:
        scales = input_scales.get(name)

        def hook(module, args, _scales=scales):
            x = args[0]
            if _scales is not None:
                x = x / _scales.to(x.dtype)
            return (fake_quant(x), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    return handles


def install_input_division(model: nn.Module, input_scales: dict[str, torch.Tensor]) -> list:
    """Float model with unfoldable smoothing scales: divide those inputs by s (exact)."""
    modules = dict(model.named_modules())
    return [
        modules[name].register_forward_pre_hook(lambda m, a, _s=s: (a[0] / _s.to(a[0].dtype), *a[1:]))
        for name, s in input_scales.items()
    ]


def set_weights(model: nn.Module, quantized: dict) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qt in quantized.items():
            weight = modules[name].weight
            weight.copy_(dequantize_groups(qt, weight.dtype))


def weight_quantizer(method: str, spec, group_size):
    if method == "rtn_minmax":
        return lambda w: rtn_quantize_weight(w, spec, group_size, 0)
    if method == "rtn_clip":
        return lambda w: rtn_quantize_weight(w, spec, group_size, 8)
    if method == "hqq":
        return lambda w: hqq_quantize_weight(w, spec, group_size)
    if method == "hqq_clip_init":
        return lambda w: hqq_quantize_weight(w, spec, group_size, init_clip_search_steps=8)
    if method == "hqq_scale":  # zero point and scale refined together (least squares), min/max start
        return lambda w: hqq_quantize_weight(w, spec, group_size, 10, refine_scale=True)
    if method == "hqq_scale_clip_init":
        return lambda w: hqq_quantize_weight(w, spec, group_size, 10, init_clip_search_steps=8, refine_scale=True)
    raise ValueError(method)


def build(
    model: nn.Module,
    names: list[str],
    method: str,
    spec,
    group_size,
    calibration: list,
    dynamic: bool = False,
    alpha: float | None = None,
    smoothing_data: str = "calibration",
    auto_alpha: bool = False,
    rotation_seed: int | None = None,
    asymmetric_tokens: bool = False,
) -> tuple[nn.Module, dict]:
    """A fake-quantized copy of ``model`` and extra fields (timings). ``rotation_seed``: the
    residual stream rotated first (``quantize(rotation=True)`` uses seed 0);
    ``asymmetric_tokens``: dynamic cases give each token a zero point (the library's default)."""
    work = copy.deepcopy(model)
    extra: dict = {}
    if rotation_seed is not None:
        start = time.perf_counter()
        rotate_residual_stream(work, rotation_seed)
        extra["rotation_s"] = time.perf_counter() - start
    input_scales: dict[str, torch.Tensor] = {}
    division_handles: list = []
    if alpha is not None:
        start = time.perf_counter()
        data = synthetic_token_batches(work) if smoothing_data == "synthetic" else calibration
        absmax = collect_activation_absmax(work, data, names)
        samples = collect_activation_samples(work, data, names) if auto_alpha else None
        plan = smoothing_plan(work, absmax, alpha, samples, dynamic_asymmetric=asymmetric_tokens)
        input_scales = apply_smoothing(work, plan)
        extra["smoothing_s"] = time.perf_counter() - start
        extra["unfoldable_linears"] = len(input_scales)
        division_handles = install_input_division(work, input_scales)
    if method == "fp32":
        quantized = {}
    elif method.startswith("gptq"):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps = 0 if method == "gptq_minmax" else 8  # group qparams: min/max or the MSE clip search
            # gptq_natural: before act-order and sample dampening (natural column order, 1% dampening)
            natural = {"act_order": False, "sample_damp": 0.0} if method == "gptq_natural" else {}
            specs = {n: (spec, group_size) for n in names}
            quantized = gptq_quantize_model(work, calibration, specs, clip_search_steps=steps, **natural)
        extra["gptq_s"] = time.perf_counter() - start
        extra["gptq_warnings"] = len(caught)
    elif method == "hqq_weighted_synthetic":  # data-free: importance from random token ids
        start = time.perf_counter()
        importance = collect_input_mean_squares(work, synthetic_token_batches(work), names)
        modules = dict(work.named_modules())
        quantized = {
            n: hqq_quantize_weight(
                modules[n].weight.detach(),
                spec,
                group_size,
                10,
                refine_scale=True,
                range_search_steps=7,
                column_weights=importance[n],
            )
            for n in names
        }
        extra["quantize_s"] = time.perf_counter() - start
    else:
        quantize = weight_quantizer(method, spec, group_size)
        start = time.perf_counter()
        modules = dict(work.named_modules())
        quantized = {n: quantize(modules[n].weight.detach()) for n in names}
        extra["quantize_s"] = time.perf_counter() - start
    set_weights(work, quantized)
    for handle in division_handles:
        handle.remove()
    if dynamic:
        install_activation_quant(work, names, input_scales, asymmetric_tokens)
    elif input_scales:
        install_input_division(work, input_scales)
    return work, extra


# -- the two models ----------------------------------------------------------------------------


def minilm_cases(quick: bool):
    int4 = [("int4_g128_rtn_minmax", "rtn_minmax"), ("int4_g128_rtn_clip", "rtn_clip"), ("int4_g128_hqq", "hqq")]
    if not quick:
        int4 += [
            ("int4_g128_hqq_clip_init", "hqq_clip_init"),
            ("int4_g128_hqq_scale", "hqq_scale"),
            ("int4_g128_hqq_scale_clip_init", "hqq_scale_clip_init"),
            ("int4_g128_gptq_natural", "gptq_natural"),
        ]
    int4 += [("int4_g128_hqq_weighted_synthetic", "hqq_weighted_synthetic"), ("int4_g128_gptq", "gptq")]
    for case, method in int4:
        yield case, dict(method=method, spec=INT4_ASYMMETRIC, group_size=128)
    yield "int8_dynamic_rtn", dict(method="rtn_minmax", spec=INT8_SYMMETRIC, group_size=None, dynamic=True)
    alphas = (0.5,) if quick else (0.3, 0.5, 0.65, 0.8)
    for alpha in alphas:
        yield (
            f"int8_dynamic_smooth_a{alpha}",
            dict(method="rtn_minmax", spec=INT8_SYMMETRIC, group_size=None, dynamic=True, alpha=alpha),
        )
    yield from int8_smoothing_variants()
    if not quick:
        yield "int8_dynamic_hqq", dict(method="hqq", spec=INT8_SYMMETRIC, group_size=None, dynamic=True)
        yield "int8_dynamic_gptq", dict(method="gptq", spec=INT8_SYMMETRIC, group_size=None, dynamic=True)
        yield (
            "int8_dynamic_smooth_a0.5_gptq",
            dict(method="gptq", spec=INT8_SYMMETRIC, group_size=None, dynamic=True, alpha=0.5),
        )


def run_minilm(quick: bool) -> None:
    from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, SENTENCES[:16] if quick else SENTENCES)
    calibration = [tokenize(tokenizer, CALIBRATION_SENTENCES)]
    reference = embed(model, evaluation)
    names = linear_names(model)
    for case, options in minilm_cases(quick):
        try:
            start = time.perf_counter()
            work, extra = build(model, names, calibration=calibration, **options)
            stats = cosine_stats(reference, embed(work, evaluation))
            emit(
                BENCH,
                f"minilm_{case}",
                model="minilm",
                cosine_mean=stats["mean"],
                cosine_min=stats["min"],
                seconds=time.perf_counter() - start,
                **extra,
            )
        except Exception as exc:  # one failing case must not hide the others
            emit_error(BENCH, f"minilm_{case}", exc, model="minilm")


def smollm2_cases():
    for case, method in [
        ("int4_g128_rtn_minmax", "rtn_minmax"),
        ("int4_g128_rtn_clip", "rtn_clip"),
        ("int4_g128_hqq", "hqq"),
        ("int4_g128_hqq_clip_init", "hqq_clip_init"),
        ("int4_g128_hqq_scale", "hqq_scale"),
        ("int4_g128_hqq_weighted_synthetic", "hqq_weighted_synthetic"),
        ("int4_g128_gptq", "gptq"),
        ("int4_g128_gptq_natural", "gptq_natural"),
    ]:
        yield case, dict(method=method, spec=INT4_ASYMMETRIC, group_size=128)
    yield "int8_dynamic_rtn", dict(method="rtn_minmax", spec=INT8_SYMMETRIC, group_size=None, dynamic=True)
    for alpha in (0.5, 0.8, 0.85):
        yield (
            f"int8_dynamic_smooth_a{alpha}",
            dict(method="rtn_minmax", spec=INT8_SYMMETRIC, group_size=None, dynamic=True, alpha=alpha),
        )
    yield from int8_smoothing_variants()


def int8_smoothing_variants():
    """SmoothQuant at alpha 0.5 from random token ids (data-free), and with alpha chosen per
    group on samples of the calibration activations."""
    int8 = dict(method="rtn_minmax", spec=INT8_SYMMETRIC, group_size=None, dynamic=True, alpha=0.5)
    yield "int8_dynamic_smooth_synthetic_a0.5", dict(int8, smoothing_data="synthetic")
    yield "int8_dynamic_smooth_auto", dict(int8, auto_alpha=True)
    # each token's own zero point (the library's default since session 14), unsmoothed and per group
    yield "int8_dynamic_asym_tokens", dict(int8, alpha=None, asymmetric_tokens=True)
    yield "int8_dynamic_asym_tokens_smooth_auto", dict(int8, auto_alpha=True, asymmetric_tokens=True)
    # the residual stream rotated (rotation=True), with and without smoothing after it; the seed
    # spread is the point: a model this small draws its int8 rounding noise chaotically
    for seed in (0, 1, 2):
        yield f"int8_dynamic_rotated_seed{seed}", dict(int8, alpha=None, rotation_seed=seed)
    yield "int8_dynamic_rotated_seed0_smooth_auto", dict(int8, auto_alpha=True, rotation_seed=0)


def run_smollm2(eval_windows: int) -> None:
    from mono_quant.testing import calibration_text, eval_text, load_smollm2, perplexity, token_windows

    model, tokenizer = load_smollm2()
    evaluation = token_windows(tokenizer, eval_text(), 512, max_windows=eval_windows)
    calibration_windows = token_windows(tokenizer, calibration_text(), 512, max_windows=16)
    calibration = [calibration_windows[i : i + 4] for i in range(0, calibration_windows.shape[0], 4)]
    names = linear_names(model, exclude=("lm_head",))
    fp32 = perplexity(model, evaluation)
    emit(BENCH, "smollm2_fp32", model="smollm2", perplexity=fp32, eval_tokens=evaluation.numel())
    rtn = None
    for case, options in smollm2_cases():
        try:
            start = time.perf_counter()
            work, extra = build(model, names, calibration=calibration, **options)
            ppl = perplexity(work, evaluation)
            fields = {"perplexity": ppl, "vs_fp32": ppl / fp32 - 1.0}
            if case == "int4_g128_rtn_minmax":  # the data-free default: the reference to beat
                rtn = ppl
            elif case.startswith("int4") and rtn is not None and rtn > fp32:
                fields["gap_closed"] = (rtn - ppl) / (rtn - fp32)
            emit(BENCH, f"smollm2_{case}", model="smollm2", seconds=time.perf_counter() - start, **fields, **extra)
            del work
        except Exception as exc:
            emit_error(BENCH, f"smollm2_{case}", exc, model="smollm2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--eval-windows", type=int, default=8, help="SmolLM2 evaluation windows of 512 tokens")
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer cases (smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    emit(BENCH, "machine", **machine())
    models = ["minilm"] if args.quick else args.models.split(",")
    for model in models:
        log(f"{BENCH}: {model}")
        try:
            if model == "minilm":
                run_minilm(args.quick)
            elif model == "smollm2":
                run_smollm2(args.eval_windows)
            else:
                raise ValueError(f"unknown model {model!r} (minilm, smollm2)")
        except ImportError as exc:
            emit(BENCH, f"{model}_skipped", reason=str(exc))


if __name__ == "__main__":
    main()
