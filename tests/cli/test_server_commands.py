"""`monoquant serve` and `monoquant submit` against a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mono_quant import load_quantized

MONOQUANT = Path(sys.executable).with_name("monoquant")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("server-data")
    port = _free_port()
    env = {**os.environ, "MONOQUANT_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [str(MONOQUANT), "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("monoquant serve did not come up: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MONOQUANT), *args], capture_output=True, text=True, timeout=180)


def test_submit_wait_downloads_a_loadable_model(server, tmp_path):
    model = _model()
    source = tmp_path / "model.safetensors"
    save_file(model.state_dict(), source)
    output = tmp_path / "out.safetensors"
    done = _run("submit", str(source), "--server", server, "--bits", "4", "--wait", "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    restored = load_quantized(output, _model())
    x = torch.randn(8, 128)
    cosine = torch.nn.functional.cosine_similarity(restored(x), model(x)).mean()
    assert cosine > 0.98


def test_submit_errors_show_the_server_suggestion(server, tmp_path):
    source = tmp_path / "model.safetensors"
    save_file(_model().state_dict(), source)
    static = _run("submit", str(source), "--server", server, "--static")
    assert static.returncode == 2
    assert "calibration" in static.stderr and "Suggestion:" in static.stderr
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad = _run("submit", str(corrupt), "--server", server)
    assert bad.returncode == 2
    assert "Error (400)" in bad.stderr and "Traceback" not in bad.stderr


def test_submit_needs_exactly_one_model_source(server):
    done = _run("submit", "--server", server)
    assert done.returncode == 2
    assert "MODEL_PATH or --model-id" in done.stderr
