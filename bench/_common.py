"""Shared helpers for the bench scripts: JSON output, alternating timing, peak RSS.

Every script prints one JSON object per line (one line per case) on stdout and nothing else
there; progress and warnings go to stderr. Timings are medians of alternating rounds: in
each round every case runs once, in the same order, so slow drifts of the machine (another
process, thermal state) hit every case alike and the ratios stay fair.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

# torch.ao.quantization (the peer) warns on import and on every use; keep stderr readable.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
warnings.filterwarnings("ignore", message=".*deprecated.*")

MIB = 1 << 20
GIB = 1 << 30


def emit(bench: str, case: str, **fields: Any) -> dict[str, Any]:
    """Print one JSON line ``{"bench", "case", ...fields}`` and return it."""
    record = {"bench": bench, "case": case, **{k: _jsonable(v) for k, v in fields.items()}}
    print(json.dumps(record), flush=True)
    return record


def emit_error(bench: str, case: str, exc: BaseException, **fields: Any) -> dict[str, Any]:
    """A case that failed: same shape as a result line, with ``error`` set."""
    return emit(bench, case, error=f"{type(exc).__name__}: {exc}"[:500], **fields)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "")
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        info["avx512_vnni"] = "avx512_vnni" in flags
        info["amx"] = "amx_int8" in flags
    except OSError:
        pass
    info["cpu_features"] = cpu_features_record()
    from mono_quant.modules.kernels import cpu_int8_engine

    info["int8_engine"] = cpu_int8_engine()  # what int8 layers run on by default here
    return info


def int8_engines() -> list[str]:
    """The CPU int8 engines this torch build has ("onednn", "fbgemm")."""
    from mono_quant.modules import kernels

    return [name for name, ok in kernels.available_int8_engines().items() if ok]


def pack_for_engine(model: Any, engine: str) -> Any:
    """Pack every int8 layer of ``model`` for ``engine`` now instead of on its first forward with
    the default one, to time the engines side by side in one run."""
    from mono_quant.modules import linear

    default = linear.cpu_int8_engine
    linear.cpu_int8_engine = lambda: engine
    try:
        for module in model.modules():
            if isinstance(module, linear.QuantizedLinear):
                module._int8_weight()  # noqa: SLF001 - the deferred packing, forced here
    finally:
        linear.cpu_int8_engine = default
    return model


def cpu_features_record() -> dict[str, Any]:
    """The CPU features the library's kernel choice reads (``mono_quant.modules.cpu_features``):
    ``{"flags": [the ones present], "capability": torch's dispatch level, "source": ...}``."""
    from mono_quant.modules.cpu_features import cpu_features

    record = cpu_features().as_dict()
    flags = [name for name, value in record.items() if value is True]
    return {"flags": flags, "capability": record["capability"], "source": record["source"]}


def alternating_medians(
    cases: dict[str, Callable[[], Any]], rounds: int, inner: int = 1, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each case, measured in alternating rounds.

    Each round calls every case ``inner`` times back to back (the time is divided by
    ``inner``); ``warmup`` untimed rounds come first.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            elapsed = (time.perf_counter() - start) / inner
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


# -- memory --------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size."""
    kib = _status_kib("VmRSS")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def anon_rss_bytes() -> int:
    """Anonymous resident memory (excludes mmap'ed file pages, which the kernel can drop)."""
    kib = _status_kib("RssAnon")
    return rss_bytes() if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since start or since the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


class PeakSampler:
    """Polls anonymous RSS in a thread: the peak of memory the process really owns.

    ``VmHWM`` also counts file pages mapped with mmap (page cache the kernel may drop at any
    time), which matters when a file is streamed through mmap; this sampler reports both.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, anon_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self.peak_anon = anon_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, anon_rss_bytes())


def run_worker(script: str, args: list[str], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and return its last JSON line."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-400:]
        raise RuntimeError(f"worker {args} exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


# -- the library under test ----------------------------------------------------------------------
def our_quantize(model: Any, bits: int, weight_only: bool = False, **kwargs: Any) -> tuple[Any, str]:
    """Quantize with ``mono_quant.quantize``: int8 dynamic (or weight-only), int4, or a 16-bit
    cast. Returns ``(quantized model, api used)``."""
    import mono_quant

    extra = dict(kwargs)
    if bits == 8:
        extra["weight_only" if weight_only else "dynamic"] = True
    result = mono_quant.quantize(model, bits=bits, **extra)
    if not result:
        raise RuntimeError(f"quantize failed: {result.errors}")
    return result.model, "mono_quant.quantize"


def torch_quantize_dynamic(model: Any) -> Any:
    """The peer: ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8 Linear)."""
    import torch
    from torch import nn

    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
