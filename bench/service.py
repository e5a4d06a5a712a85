"""Service benchmark: enqueue latency of concurrent submissions, and server RSS during a big upload.

Starts a real uvicorn server on 127.0.0.1 (embedded defaults, temporary data dir) and prints
one JSON line:
  {"submissions": 50, "enqueue_p50_ms": ..., "enqueue_p99_ms": ..., "upload_bytes": ...,
   "rss_before_mib": ..., "rss_peak_mib": ..., "rss_growth_mib": ..., "rss_growth_ok": true}
The upload is streamed (chunked, no Content-Length) and is not a model, so it ends 415 once
fully received: what is measured is the streaming path every upload takes.

    python bench/service.py            # 1 GiB upload, 50 submissions
    python bench/service.py --quick    # 256 MiB upload, 20 submissions
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start(data_dir: Path, upload_limit: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "MONOQUANT_DATA_DIR": str(data_dir),
        "MONOQUANT_MAX_UPLOAD_BYTES": str(upload_limit),
        "MONOQUANT_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    command += ["--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not start")


async def _enqueue_latencies(base: str, count: int, model: bytes) -> list[float]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:

        async def one() -> float:
            started = time.perf_counter()
            response = await http.post("/v1/quantize", files={"model": ("m.safetensors", model)}, data={"bits": "8"})
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _upload_rss(base: str, pid: int, total: int) -> dict[str, float]:
    before = _rss_mib(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    boundary = "benchboundary"
    chunk = os.urandom(MIB)

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'.encode()
        for _ in range(total // MIB):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{base}/v1/models",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=600,
    )
    done.set()
    sampler.join()
    return {"status": response.status_code, "before": before, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB upload and 20 submissions")
    args = parser.parse_args()
    upload_bytes = (256 if args.quick else 1024) * MIB
    submissions = 20 if args.quick else 50
    torch.manual_seed(0)
    buffer = io.BytesIO(save({"fc.weight": torch.randn(256, 256), "fc.bias": torch.randn(256)}))
    with tempfile.TemporaryDirectory(prefix="monoquant-bench-") as data_dir:
        process, base = _start(Path(data_dir), upload_bytes + MIB)
        try:
            latencies = asyncio.run(_enqueue_latencies(base, submissions, buffer.getvalue()))
            rss = _upload_rss(base, process.pid, upload_bytes)
        finally:
            process.terminate()
            process.wait(30)
    latencies.sort()
    growth = rss["peak"] - rss["before"]
    print(
        json.dumps(
            {
                "submissions": submissions,
                "enqueue_p50_ms": round(statistics.median(latencies), 1),
                "enqueue_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
                "upload_bytes": upload_bytes,
                "upload_status": rss["status"],
                "rss_before_mib": round(rss["before"], 1),
                "rss_peak_mib": round(rss["peak"], 1),
                "rss_growth_mib": round(growth, 1),
                "rss_growth_ok": growth < 64,
            }
        )
    )


if __name__ == "__main__":
    main()
