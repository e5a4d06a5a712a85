"""The installed console scripts, run as real processes: ``monoquant`` and its alias ``mq``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mono_quant import load_quantized, read_metadata

from .conftest import make_mlp

BIN = Path(sys.executable).parent


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = BIN / script
    if not executable.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable}")
    return subprocess.run([str(executable), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_monoquant_quantize_then_mq_info(model_file, tmp_path):
    done = _run("monoquant", "quantize", model_file.name, "--bits", "4", "--group-size", "32", "-o", "q4.safetensors",
                "--no-progress", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote q4.safetensors")
    out = tmp_path / "q4.safetensors"
    assert set(read_metadata(out)["layers"]) == {"0", "2", "4"}
    restored = load_quantized(out, make_mlp(seed=9))
    with torch.inference_mode():
        assert restored(torch.randn(2, 128)).shape == (2, 10)

    info = _run("mq", "info", "--json", "q4.safetensors", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["metadata"]["layers"]["0"]["bits"] == 4
    assert data["size_bytes"] == out.stat().st_size


def test_mq_error_exit_status_and_message(tmp_path):
    torch.save(make_mlp(), tmp_path / "whole.pt")
    done = _run("mq", "quantize", "whole.pt", "-o", "x.safetensors", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Error (UnsupportedFormatError): whole.pt contains pickled Python objects")
    assert lines[1].startswith("Suggestion: Save a state_dict to safetensors instead")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.safetensors").exists()
