"""Export times: each format written from a quantized all-MiniLM-L6-v2, beside the peer.

The peer is transformers' own ``save_pretrained`` of the fp32 model (what a user would
otherwise write); ``x_peer`` is the export's time over the peer's in the same run. Each
export runs twice: ``cold_s`` is the first call in this process (imports and first-call
costs included: what a user pays once), ``warm_s`` the second. ``bytes`` is what it wrote.

Usage: ``python bench/export_speed.py [--quick]`` (``--quick``: int8 weight-only only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit, emit_error, log, machine

BENCH = "export_speed"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    try:
        from mono_quant import quantize
        from mono_quant.testing import SENTENCES, load_minilm, tokenize
    except ImportError as exc:  # transformers or the packaged model missing
        emit(BENCH, "skipped", reason=str(exc))
        return
    model, tokenizer = load_minilm()
    sample = tokenize(tokenizer, SENTENCES[:2])
    modes = {"int8_weight_only": {"bits": 8, "weight_only": True}}
    if not args.quick:
        modes["int8_dynamic"] = {"bits": 8, "dynamic": True}
        modes["int4_g128_sym"] = {"bits": 4, "scheme": "symmetric"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peer = [_timed(lambda i=i: model.save_pretrained(root / f"peer{i}")) for i in range(2)]
        emit(
            BENCH,
            "peer_save_pretrained_fp32",
            mode="fp32",
            format="save_pretrained",
            cold_s=peer[0],
            warm_s=peer[1],
            x_peer=1.0,
            bytes=_size(root / "peer0"),
            machine=machine(),
        )
        for mode, kwargs in modes.items():
            result = quantize(model, **kwargs)
            targets = {
                "safetensors": (None, "model.safetensors", {}),
                "compressed-tensors": ("compressed-tensors", "ct", {"tokenizer": tokenizer}),
                "gguf": ("gguf", "model.gguf", {"tokenizer": tokenizer}),
                "onnx": ("onnx", "model.onnx", {"sample_inputs": sample}),
            }
            for name, (fmt, filename, extra) in targets.items():
                case = f"{mode}_{name}"
                try:
                    times, written = [], None
                    for i in range(2):
                        path = root / f"{case}-{i}" / filename
                        path.parent.mkdir(parents=True, exist_ok=True)
                        start = time.perf_counter()
                        written = result.save(path, format=fmt, **extra)
                        times.append(time.perf_counter() - start)
                    emit(
                        BENCH,
                        case,
                        mode=mode,
                        format=name,
                        cold_s=times[0],
                        warm_s=times[1],
                        x_peer=times[1] / peer[1],
                        bytes=_size(Path(written)),
                    )
                except Exception as exc:  # a format may refuse a mode: recorded, not fatal
                    emit_error(BENCH, case, exc, mode=mode, format=name)
            log(f"{mode} done")


if __name__ == "__main__":
    main()
