"""Smoke test of bench/: each CPU script runs with --quick and prints valid JSON lines.

Never a timing assertion: the figures depend on the machine. Only that every script runs,
exits 0, prints one JSON object per stdout line, and that each case carries the keys the
RESULTS table is built from (or says why it was skipped).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

# script -> keys every non-skipped, non-error line must have
EXPECTED = {
    "quantize_speed.py": {"median_s", "gb_per_s", "speedup_vs_peer", "x_copy_floor", "extra_peak_mib"},
    "inference.py": {"model", "batch", "mode", "median_ms", "x_fp32", "speedup_vs_peer"},
    "accuracy.py": {"cosine_mean", "cosine_min", "weight_sqnr_db_mean"},
    "memory.py": {"file_bytes", "peak_rss_mib", "peak_rss_frac", "peak_anon_frac", "seconds"},
    "export_speed.py": {"mode", "format", "cold_s", "warm_s", "x_peer", "bytes"},
    "gpu.py": set(),  # CUDA only: elsewhere it prints one "skipped" line
}
EXPECTED_CASES = {
    "quantize_speed.py": {"copy", "ours_int8", "ours_int4_g128", "torch_quantize_dynamic"},
    "memory.py": {"quantize_file_int8", "quantize_file_int4", "in_memory_int8", "in_memory_int4"},
}


def run_quick(script: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing on stdout:\n{proc.stderr[-2000:]}"
    records = []
    for line in lines:
        record = json.loads(line)  # every stdout line is one JSON object
        assert isinstance(record, dict)
        assert record["bench"] == script.removesuffix(".py")
        assert isinstance(record["case"], str) and record["case"]
        records.append(record)
    return records


@pytest.mark.parametrize("script", sorted(EXPECTED), ids=lambda s: s.removesuffix(".py"))
def test_quick_run_prints_json_lines(script: str) -> None:
    records = run_quick(script)
    results = [r for r in records if "skipped" not in r]
    errors = [r for r in results if "error" in r]
    assert not errors, f"{script} reported failing cases: {errors}"
    if script == "gpu.py" and len(records) == 1 and "skipped" in records[0]:
        return
    for record in results:
        if record["case"] in ("device", "all"):
            continue
        missing = EXPECTED[script] - record.keys()
        assert not missing, f"{script} case {record['case']} lacks {sorted(missing)}"
    cases = {r["case"] for r in records}
    if script in EXPECTED_CASES and not any("skipped" in r for r in records):
        assert EXPECTED_CASES[script] <= cases, f"{script} missing cases {EXPECTED_CASES[script] - cases}"
