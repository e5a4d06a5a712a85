"""Peak memory: streaming ``quantize_file`` vs in-memory ``quantize()`` on the same model.

A synthetic fp32 safetensors file (``layers.{i}.weight`` / ``.bias`` of Linear(4096, 4096),
2 GiB; ``--quick``: 4 x Linear(2048, 2048), 64 MiB) is written under /tmp, one tensor at a
time, and deleted at the end. Each case runs in a fresh process and reports its peak RSS
above the process's baseline after imports (``VmHWM``, which also counts file pages the
process maps), the peak of anonymous memory (sampled every 2 ms), both as fractions of the
file size, and the wall time:

* ``quantize_file_int8`` / ``quantize_file_int4``: ``mono_quant.quantize_file(src, dst, ...)``
  (int4: group 128 with the default data-free method, round to nearest on min/max ranges).
* ``in_memory_int8`` / ``in_memory_int4``: load the file into an ``nn.Sequential`` of Linear
  layers, then ``quantize(model, ...)``; also the extra peak over the loaded model.

Usage: ``python bench/memory.py [--quick] [--keep-going]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from _common import (
    GIB,
    MIB,
    PeakSampler,
    anon_rss_bytes,
    emit,
    emit_error,
    log,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_worker,
)

BENCH = "memory"
CASES = ("quantize_file_int8", "quantize_file_int4", "in_memory_int8", "in_memory_int4")


def shape_plan(quick: bool) -> tuple[int, int]:
    """``(layers, features)``: about 2 GiB of fp32 Linear weights, 64 MiB with --quick."""
    return (4, 2048) if quick else (32, 4096)


def write_synthetic(path: Path, layers: int, features: int) -> int:
    """A safetensors file of ``layers`` fp32 Linear(features, features), written tensor by
    tensor (never the whole model in memory). Returns the file size."""
    import torch

    entries: dict[str, dict] = {}
    offset = 0
    for i in range(layers):
        for name, shape in ((f"layers.{i}.weight", [features, features]), (f"layers.{i}.bias", [features])):
            size = 4
            for d in shape:
                size *= d
            entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(0)
    bound = 1.0 / features**0.5  # nn.Linear's default init range
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for entry in entries.values():
            tensor = (torch.rand(entry["shape"], generator=generator) * 2 - 1) * bound
            f.write(tensor.numpy().tobytes())
    return path.stat().st_size


def run_case(case: str, src: Path, layers: int, features: int, quick: bool) -> dict:
    """Runs in a fresh process: one case, its peak memory above the post-import baseline."""
    import torch
    from torch import nn

    import mono_quant

    bits = 8 if case.endswith("int8") else 4
    options: dict = {"group_size": 128} if bits == 4 else {}
    file_size = src.stat().st_size
    gc.collect()
    baseline = rss_bytes()
    baseline_anon = anon_rss_bytes()
    reset_peak_rss()
    fields: dict = {"bits": bits, "file_bytes": file_size}
    with PeakSampler() as sampler:
        start = time.perf_counter()
        if case.startswith("quantize_file"):
            dst = src.with_name(f"{case}.safetensors")
            try:
                mono_quant.quantize_file(src, dst, bits=bits, **options)
                fields["output_bytes"] = dst.stat().st_size
            finally:
                dst.unlink(missing_ok=True)
        else:
            from safetensors.torch import load_file

            with torch.device("meta"):
                model = nn.Sequential(*[nn.Linear(features, features) for _ in range(layers)])
            # clone: load_file maps the file; a model "in memory" owns its weights
            state = {k.removeprefix("layers."): v.clone() for k, v in load_file(str(src)).items()}
            model.load_state_dict(state, assign=True)
            del state
            loaded = rss_bytes()
            fields["load_s"] = time.perf_counter() - start
            loaded_peak = peak_rss_bytes()
            reset_peak_rss()
            result = mono_quant.quantize(model, bits=bits, dynamic=bits == 8, **options)
            if not result.success:
                raise RuntimeError(f"quantize failed: {result.errors}")
            extra = peak_rss_bytes() - loaded
            fields["extra_peak_over_loaded_mib"] = extra / MIB
            fields["extra_peak_over_loaded_frac"] = extra / file_size
            fields["quantize_s"] = time.perf_counter() - start - fields["load_s"]
        seconds = time.perf_counter() - start
    peak = max(peak_rss_bytes(), locals().get("loaded_peak", 0)) - baseline
    anon = sampler.peak_anon - baseline_anon
    fields.update(
        seconds=seconds,
        peak_rss_mib=peak / MIB,
        peak_rss_frac=peak / file_size,
        peak_anon_mib=anon / MIB,
        peak_anon_frac=anon / file_size,
    )
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB file (CI smoke test)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers, features = shape_plan(args.quick)

    if args.worker:
        emit(BENCH, args.worker, **run_case(args.worker, Path(args.src), layers, features, args.quick))
        return

    import mono_quant

    if not hasattr(mono_quant, "quantize_file"):
        emit(BENCH, "all", skipped="mono_quant.quantize_file is not available in this version")
        return
    tmpdir = Path(tempfile.mkdtemp(prefix="mono_quant_bench_", dir="/tmp"))
    try:
        src = tmpdir / "synthetic_fp32.safetensors"
        size = write_synthetic(src, layers, features)
        log(f"{BENCH}: {layers} x Linear({features}, {features}) = {size / GIB:.2f} GiB at {src}")
        for case in CASES:
            flags = ["--worker", case, "--src", str(src)] + (["--quick"] if args.quick else [])
            try:
                record = run_worker(__file__, flags)
                emit(
                    BENCH,
                    case,
                    layers=layers,
                    features=features,
                    **{k: v for k, v in record.items() if k not in ("bench", "case")},
                )
            except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
                emit_error(BENCH, case, exc, layers=layers, features=features)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if os.path.exists(tmpdir):
            log(f"{BENCH}: could not remove {tmpdir}")


if __name__ == "__main__":
    main()
