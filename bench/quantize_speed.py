"""Quantization speed: a stack of nn.Linear(4096, 4096) fp32 layers, ours vs the peers, cold and warm.

Cases (one JSON line each):

* ``copy``: the weights copied into fresh fp32 tensors, the memory-bandwidth floor.
* ``ours_int8``: ``quantize(model, bits=8, dynamic=True)``: int8 per channel, per-token activations.
* ``ours_int4_g128``: ``quantize(model, bits=4)``: int4 group-128 with the default data-free
  method (round to nearest, min/max ranges).
* ``ours_int4_g128_clip8``: the same with the MSE clip search (``clip_search_steps=8``); not in
  ``--quick``.
* ``torch_quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` (the peer).

Each line carries both figures, with ratios to the peer and to the copy floor of the same run:

* cold (``cold_*``): what a user sees quantizing once, each case in a fresh process: the
  ``quantize()`` call alone (``import_s`` says what importing torch and the library took
  before it), with every first-call cost inside (kernel setup, page faults of fresh memory).
  Then one batch-1 forward (``first_forward_ms``) and the median of three more
  (``steady_forward_ms``): what the first forward pays on top (``first_forward_extra_ms``) is
  work a layer defers from construction (oneDNN packs int8 weights on the first forward), so
  ``cold_plus_first_forward_s`` is the figure to compare when the model is going to run.
  ``extra_peak_mib`` / ``extra_peak_frac``: peak RSS of that process during ``quantize()``
  over the built model.
* warm (``median_s``, ``gb_per_s``, ``speedup_vs_peer``, ``x_copy_floor``): median of
  alternating rounds in one process after a warm-up round.

Usage: ``python bench/quantize_speed.py [--quick] [--layers N] [--rounds R] [--cases a,b]``
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before torch is imported: import_s of the cold workers

import argparse  # noqa: E402
import gc  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
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
from torch import nn  # noqa: E402

import mono_quant  # noqa: E402, F401 - imported here so that import_s counts it

BENCH = "quantize_speed"
FEATURES = 4096
PEER = "torch_quantize_dynamic"
FLOOR = "copy"
SLOW_CASES = ("ours_int4_g128_clip8",)  # left out of --quick


def build_model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        return nn.Sequential(*[nn.Linear(FEATURES, FEATURES) for _ in range(layers)]).eval()


def fp32_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_cases(model: nn.Module, quick: bool) -> dict:
    sources = [p.detach() for p in model.parameters()]
    targets = [torch.empty_like(p) for p in sources]  # warm rounds reuse them

    def copy():
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src)
        return targets

    cases = {
        FLOOR: copy,
        "ours_int8": lambda: our_quantize(model, bits=8)[0],
        "ours_int4_g128": lambda: our_quantize(model, bits=4)[0],
        "ours_int4_g128_clip8": lambda: our_quantize(model, bits=4, clip_search_steps=8)[0],
        PEER: lambda: torch_quantize_dynamic(model),
    }
    return {name: fn for name, fn in cases.items() if not (quick and name in SLOW_CASES)}


def _forward_ms(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3


def cold_run(case: str, layers: int) -> dict:
    """One cold run of ``case`` in this (fresh) process: the call's wall time, its extra peak
    RSS over the built model, then the first and steady batch-1 forwards of the result."""
    imported = time.perf_counter() - _STARTED
    model = build_model(layers)
    fn = make_cases(model, quick=False)[case]
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    fields = {"cold_s": seconds, "extra_peak_bytes": extra, "import_s": imported}
    if isinstance(result, nn.Module):
        x = torch.randn(1, FEATURES)
        with torch.no_grad():
            first = _forward_ms(result, x)
            steady = sorted(_forward_ms(result, x) for _ in range(3))[1]
        fields |= {"first_forward_ms": first, "steady_forward_ms": steady, "first_forward_extra_ms": first - steady}
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, one round, no clip-search case (CI)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cases", default=None, help="comma-separated subset (the peer and the floor always run)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = args.layers or (2 if args.quick else 16)

    if args.worker:
        emit(BENCH, args.worker, **cold_run(args.worker, layers))
        return

    rounds = args.rounds or (1 if args.quick else 3)
    model = build_model(layers)
    size = fp32_bytes(model)
    cases = make_cases(model, args.quick)
    if args.cases:
        wanted = {*args.cases.split(","), PEER, FLOOR}
        cases = {name: fn for name, fn in cases.items() if name in wanted}
    log(f"{BENCH}: {layers} x Linear({FEATURES}, {FEATURES}) = {size / MIB:.0f} MiB fp32, {rounds} warm rounds")

    # Warm: alternating rounds, every case once per round, one untimed warm-up round first.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(1 + rounds):
        for name, fn in cases.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if round_index >= 1:
                samples[name].append(elapsed)
    medians = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    del model, cases
    gc.collect()

    # Cold: a fresh process per case, one after the other (never two at once).
    cold: dict[str, dict] = {}
    for name in samples:
        log(f"{BENCH}: cold run of {name} in a fresh process")
        try:
            worker = run_worker(__file__, ["--worker", name, "--layers", str(layers)])
            cold[name] = {k: v for k, v in worker.items() if k not in ("bench", "case")}
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            cold[name] = {"cold_error": f"{type(exc).__name__}: {exc}"[:300]}

    env = machine()
    peer_cold = cold.get(PEER, {}).get("cold_s")
    floor_cold = cold.get(FLOOR, {}).get("cold_s")
    peer_total = None if peer_cold is None else peer_cold + cold[PEER].get("first_forward_ms", 0.0) / 1e3
    for name, seconds in medians.items():
        try:
            mem = dict(cold.get(name, {}))
            extra = mem.pop("extra_peak_bytes", None)
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
                "rss_method": "fresh_process",
                **mem,
            }
            cold_s = mem.get("cold_s")
            if cold_s:
                fields["cold_gb_per_s"] = size / cold_s / 1e9
                fields["cold_speedup_vs_peer"] = None if peer_cold is None else peer_cold / cold_s
                fields["cold_x_copy_floor"] = None if floor_cold is None else cold_s / floor_cold
                if "first_forward_ms" in mem:
                    total = cold_s + mem["first_forward_ms"] / 1e3
                    fields["cold_plus_first_forward_s"] = total
                    ratio = None if peer_total is None else peer_total / total
                    fields["cold_plus_first_forward_speedup_vs_peer"] = ratio
            if name == FLOOR:
                fields["read_write_gb_per_s"] = 2 * size / seconds / 1e9
            emit(BENCH, name, peer=PEER, threads=env["threads"], torch=env["torch"], cpu=env.get("cpu"), **fields)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, name, exc)


if __name__ == "__main__":
    main()
