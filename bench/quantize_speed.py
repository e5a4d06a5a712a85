"""Quantization speed: a stack of nn.Linear(4096, 4096) fp32 layers, ours vs the peers.

Cases (one JSON line each):

* ``copy``: ``dst.copy_(weight)`` into preallocated fp32 tensors, the memory-bandwidth floor.
* ``ours_int8``: int8 per-channel symmetric (what ``quantize(model, bits=8)`` does).
* ``ours_int4_g128``: int4 group-128 with the library's default MSE clipping search.
* ``ours_int4_g128_minmax``: int4 group-128, plain min/max (``clip_search_steps=0``).
* ``torch_quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` (the peer).

Each line has the median wall time of alternating in-process rounds, GB/s of fp32 weights
processed, the ratio to the peer and to the copy floor, and the extra peak RSS of a cold run
in a fresh process (``--quick`` measures it in-process instead, to stay fast).

Usage: ``python bench/quantize_speed.py [--quick] [--layers N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import (
    MIB,
    emit,
    emit_error,
    log,
    machine,
    our_quantize,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_worker,
    torch_quantize_dynamic,
)
from torch import nn

BENCH = "quantize_speed"
FEATURES = 4096
PEER = "torch_quantize_dynamic"
FLOOR = "copy"


def build_model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        return nn.Sequential(*[nn.Linear(FEATURES, FEATURES) for _ in range(layers)]).eval()


def fp32_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_cases(model: nn.Module) -> dict:
    targets = [torch.empty_like(p) for p in model.parameters()]
    sources = [p.detach() for p in model.parameters()]

    def copy():
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src)
        return targets

    return {
        FLOOR: copy,
        "ours_int8": lambda: our_quantize(model, bits=8)[0],
        "ours_int4_g128": lambda: our_quantize(model, bits=4, group_size=128)[0],
        "ours_int4_g128_minmax": lambda: our_quantize(model, bits=4, group_size=128, clip_search_steps=0)[0],
        PEER: lambda: torch_quantize_dynamic(model),
    }


def cold_run(case: str, layers: int) -> dict:
    """One cold run of ``case``: wall time and extra peak RSS over the built model."""
    model = build_model(layers)
    fn = make_cases(model)[case]
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    del result
    return {"cold_s": seconds, "extra_peak_bytes": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, one round (CI smoke test)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = args.layers or (2 if args.quick else 16)

    if args.worker:
        emit(BENCH, args.worker, **cold_run(args.worker, layers))
        return

    rounds = args.rounds or (1 if args.quick else 3)
    model = build_model(layers)
    size = fp32_bytes(model)
    cases = make_cases(model)
    log(f"{BENCH}: {layers} x Linear({FEATURES}, {FEATURES}) = {size / MIB:.0f} MiB fp32, {rounds} rounds")

    # Alternating rounds: every case once per round, one warm-up round first.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range((0 if args.quick else 1) + rounds):
        for name, fn in cases.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if args.quick or round_index >= 1:
                samples[name].append(elapsed)
    medians = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}

    # Extra peak RSS: a fresh process per case (--quick: in this process, less exact
    # because the allocator may reuse memory freed by an earlier case).
    memory: dict[str, dict] = {}
    for name in cases:
        try:
            if args.quick:
                memory[name] = cold_run(name, layers) | {"rss_method": "in_process"}
            else:
                worker = run_worker(__file__, ["--worker", name, "--layers", str(layers)])
                memory[name] = {k: worker[k] for k in ("cold_s", "extra_peak_bytes")} | {"rss_method": "fresh_process"}
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            memory[name] = {"rss_error": f"{type(exc).__name__}: {exc}"[:300]}

    env = machine()
    for name, seconds in medians.items():
        try:
            mem = memory.get(name, {})
            extra = mem.get("extra_peak_bytes")
            fields = {
                "layers": layers,
                "fp32_bytes": size,
                "median_s": seconds,
                "samples_s": samples[name],
                "gb_per_s": size / seconds / 1e9,
                "speedup_vs_peer": medians[PEER] / seconds,
                "x_copy_floor": seconds / medians[FLOOR],
                "extra_peak_mib": None if extra is None else extra / MIB,
                "extra_peak_frac": None if extra is None else extra / size,
                **{k: v for k, v in mem.items() if k != "extra_peak_bytes"},
            }
            if name == FLOOR:
                fields["read_write_gb_per_s"] = 2 * size / seconds / 1e9
            emit(BENCH, name, peer=PEER, threads=env["threads"], torch=env["torch"], **fields)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, name, exc)


if __name__ == "__main__":
    main()
