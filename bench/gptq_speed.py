"""GPTQ timing: ``quantize(model, bits=4, method="gptq")`` on SmolLM2-135M, per model and per layer.

Calibration: 16 windows of 512 tokens of ``mono_quant.testing.calibration_text()`` (what the
tests and ``bench/accuracy_algorithms.py`` use), one window per batch. Lines:

* ``gptq_model``: the whole ``quantize()`` call (``total_s``) against two peers measured in
  the same run: round-to-nearest ``quantize(model, bits=4)`` (``rtn_s``) and one fp32 forward
  of the calibration tokens (``calibration_forward_s``, the least any calibrated method
  costs); where the time went: Hessian accumulation (``hessian_s``), the GPTQ solves
  (``solve_s``, every ``gptq_quantize_weight`` call) and the rest (block forwards, building
  the layers); the time per decoder block (``block_s``); the goal (``goal_s``: 120).
* ``gptq_layers``: per kind of solve (q/k/v stacked, o_proj, gate/up stacked, down_proj):
  its shape, count, total and mean seconds; the slowest single solves.

Nothing is timed in ``--quick`` (CI): the script is slow by nature and not part of it.

Usage: ``python bench/gptq_speed.py [--windows 16] [--window 512]``
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

from _common import emit, emit_error, log, machine

BENCH = "gptq_speed"
GOAL_S = 120.0


class _Timings:
    """Wraps the GPTQ building blocks (module attributes) to time every call, and restores them."""

    def __init__(self) -> None:
        self.solves: list[dict[str, Any]] = []
        self.hessian_s = 0.0
        self.hessian_calls = 0
        self.progress: list[tuple[float, str, float]] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        from mono_quant.core.algorithms import gptq

        original_solve = gptq.gptq_quantize_weight

        def timed_solve(weight, hessian, *args, **kwargs):
            start = time.perf_counter()
            result = original_solve(weight, hessian, *args, **kwargs)
            self.solves.append(
                {"name": kwargs.get("name") or "?", "shape": list(weight.shape), "s": time.perf_counter() - start}
            )
            return result

        original_add = gptq.HessianAccumulator.add

        def timed_add(accumulator, x):
            start = time.perf_counter()
            original_add(accumulator, x)
            self.hessian_s += time.perf_counter() - start
            self.hessian_calls += 1

        self._restore = [
            (gptq, "gptq_quantize_weight", original_solve),
            (gptq.HessianAccumulator, "add", original_add),
        ]
        gptq.gptq_quantize_weight = timed_solve
        gptq.HessianAccumulator.add = timed_add

    def uninstall(self) -> None:
        for owner, name, value in self._restore:
            setattr(owner, name, value)

    def callback(self, stage: str, fraction: float) -> None:
        self.progress.append((time.perf_counter(), stage, fraction))


def _kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj, ...k_proj, ...v_proj`` -> ``q_proj+k_proj+v_proj``."""
    return "+".join(part.strip().rsplit(".", 1)[-1] for part in name.split(","))


def _block_seconds(progress: list[tuple[float, str, float]], start: float) -> list[float]:
    """Seconds between successive GPTQ progress reports (one per decoder block)."""
    times = [start] + [t for t, stage, _ in progress if stage == "gptq"]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--quick", action="store_true", help="print one skipped line (GPTQ is not a quick check)")
    args = parser.parse_args()
    if args.quick:
        emit(BENCH, "all", skipped="GPTQ timing takes minutes; run without --quick")
        return

    import torch

    import mono_quant
    from mono_quant.testing import calibration_text, load_smollm2, token_windows

    try:
        model, tokenizer = load_smollm2()
    except Exception as exc:  # noqa: BLE001 - the model is an optional package
        emit(BENCH, "all", skipped=f"SmolLM2 is not available: {type(exc).__name__}: {exc}"[:300])
        return
    windows = token_windows(tokenizer, calibration_text(), args.window, max_windows=args.windows)
    calibration = [{"input_ids": w.unsqueeze(0)} for w in windows]
    env = machine()
    log(f"{BENCH}: SmolLM2-135M, {windows.shape[0]} x {windows.shape[1]} calibration tokens, {env['threads']} threads")

    with torch.inference_mode():
        start = time.perf_counter()
        for batch in calibration:
            model(**batch)
        forward_s = time.perf_counter() - start
    start = time.perf_counter()
    rtn = mono_quant.quantize(model, bits=4)
    rtn_s = time.perf_counter() - start
    if not rtn:
        emit_error(BENCH, "gptq_model", RuntimeError(f"round-to-nearest failed: {rtn.errors}"))
        return
    del rtn

    timings = _Timings()
    timings.install()
    try:
        start = time.perf_counter()
        result = mono_quant.quantize(
            model,
            bits=4,
            method="gptq",
            calibration_data=calibration,
            progress_callback=timings.callback,
        )
        total_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        emit_error(BENCH, "gptq_model", exc)
        return
    finally:
        timings.uninstall()
    if not result:
        emit_error(BENCH, "gptq_model", RuntimeError(f"GPTQ failed: {result.errors}"))
        return

    solve_s = sum(s["s"] for s in timings.solves)
    blocks = _block_seconds(timings.progress, start)
    emit(
        BENCH,
        "gptq_model",
        model="SmolLM2-135M",
        calibration_tokens=windows.numel(),
        total_s=total_s,
        goal_s=GOAL_S,
        meets_goal=total_s <= GOAL_S,
        rtn_s=rtn_s,
        x_rtn=total_s / rtn_s,
        calibration_forward_s=forward_s,
        x_calibration_forward=total_s / forward_s,
        hessian_s=timings.hessian_s,
        hessian_calls=timings.hessian_calls,
        solve_s=solve_s,
        solve_calls=len(timings.solves),
        other_s=total_s - solve_s - timings.hessian_s,
        block_s=blocks,
        slowest_block_s=max(blocks) if blocks else None,
        threads=env["threads"],
        torch=env["torch"],
        cpu=env.get("cpu"),
    )

    kinds: dict[str, list[dict]] = defaultdict(list)
    for solve in timings.solves:
        kinds[_kind(solve["name"])].append(solve)
    per_kind = {
        kind: {
            "shape": items[0]["shape"],
            "count": len(items),
            "total_s": sum(i["s"] for i in items),
            "mean_s": sum(i["s"] for i in items) / len(items),
            "max_s": max(i["s"] for i in items),
        }
        for kind, items in kinds.items()
    }
    slowest = sorted(timings.solves, key=lambda s: -s["s"])[:5]
    emit(BENCH, "gptq_layers", per_kind=per_kind, slowest=slowest, threads=env["threads"])


if __name__ == "__main__":
    main()
