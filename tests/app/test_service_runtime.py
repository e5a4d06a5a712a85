"""Runtime behaviour: a real uvicorn process killed mid-job and restarted, 50 concurrent
submissions, and signed webhooks to a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

from app.jobs.webhooks import verify
from tests.app.conftest import upload, wait_for

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MONOQUANT_DATA_DIR": str(data_dir),
        "MONOQUANT_WORKERS": "1",
        "MONOQUANT_DISPATCH_INTERVAL_S": "0.1",
        "MONOQUANT_TRUSTED_INPUTS": "true",  # the slow job's model is a pickled test module
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    with open(log, "ab") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_kill_and_restart_loses_nothing(tmp_path, tiny_model_file, slow_job):
    port, log = _free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path / "data", port, log)
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            done = http.post("/v1/quantize", files=upload(tiny_model_file)).json()
            done = wait_for(http, done["id"])
            assert done["status"] == "succeeded"
            before = {a["name"]: a["sha256"] for a in http.get(f"/v1/jobs/{done['id']}/artifacts").json()}
            interrupted = http.post("/v1/quantize", files=slow_job[0], data=slow_job[1]).json()
            queued = http.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "4"}).json()
            assert wait_for(http, interrupted["id"], statuses=("running",), timeout=60)["status"] == "running"
            server.send_signal(signal.SIGKILL)
            server.wait(10)
        server = _start_server(tmp_path / "data", port, log)
        with httpx.Client(base_url=base, timeout=60) as http:
            retried = wait_for(http, interrupted["id"], timeout=120)
            assert retried["status"] == "succeeded", retried
            assert retried["attempt"] == 2
            events = [event["type"] for event in http.get(f"/v1/jobs/{interrupted['id']}/events").json()]
            assert events.count("running") == 2 and "requeued" in events
            assert wait_for(http, queued["id"])["status"] == "succeeded"
            after = {a["name"]: a["sha256"] for a in http.get(f"/v1/jobs/{done['id']}/artifacts").json()}
            assert after == before
            body = http.get(f"/v1/jobs/{done['id']}/artifacts/model.safetensors").content
            assert hashlib.sha256(body).hexdigest() == before["model.safetensors"]
    finally:
        server.kill()
        server.wait(10)


def test_job_left_running_by_a_dead_worker_fails_when_out_of_attempts(tmp_path, tiny_model_file):
    """No retry left: the job fails with a reason, it is never left "running"."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.conftest import running_service, settings_for

    paused = create_app(settings_for(tmp_path))
    context = paused.state.context
    context.storage.ensure()
    context.store.create_all()
    job_id = TestClient(paused).post("/v1/quantize", files=upload(tiny_model_file)).json()["id"]
    assert context.store.claim(job_id, f"{socket.gethostname()}:999999") == 1  # a pid that does not exist
    context.store.dispose()
    with running_service(tmp_path, max_attempts=1) as http:
        job = wait_for(http, job_id, timeout=30)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "WorkerLost"
    assert "found running at startup" in job["error"]["message"]


@pytest.mark.slow
def test_fifty_concurrent_submissions_all_finish_once(service, tiny_model_file):
    payload = tiny_model_file.read_bytes()

    async def submit_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/quantize", files={"model": ("m.safetensors", payload)}, data={"bits": "8"})
                    for _ in range(50)
                )
            )

    responses = asyncio.run(submit_all())
    assert [r.status_code for r in responses] == [202] * 50
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 50
    for job_id in ids:
        job = wait_for(service, job_id, timeout=120)
        assert job["status"] == "succeeded" and job["attempt"] == 1
        events = [event["type"] for event in service.get(f"/v1/jobs/{job_id}/events").json()]
        assert events.count("running") == 1 and events.count("succeeded") == 1


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_signed_webhook_on_job_end(make_service, tiny_model_file):
    secret = "whsec_" + "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        with make_service(webhook_secret=secret, webhook_allow_private=True) as http:
            job = http.post("/v1/quantize", files=upload(tiny_model_file), data={"callback_url": url}).json()
            wait_for(http, job["id"])
            deadline = time.monotonic() + 20
            while not _Receiver.received and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        receiver.shutdown()
    assert len(_Receiver.received) == 1
    headers, body = _Receiver.received[0]
    assert verify(secret, headers, body)
    assert not verify("whsec_" + "b3RoZXIgc2VjcmV0IG90aGVyIHNlY3JldCBvdGhlcg==", headers, body)
    assert headers["webhook-id"] == f"msg_{job['id']}_1"
    payload = json.loads(body)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert {a["name"] for a in payload["data"]["artifacts"]} == {"model.safetensors", "report.json"}


def test_callback_url_on_a_private_address_is_refused_by_default(make_service, tiny_model_file):
    with make_service() as http:
        for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://localhost/hook"):
            response = http.post("/v1/quantize", files=upload(tiny_model_file), data={"callback_url": url})
            assert response.status_code == 400, response.text
            body = response.json()
            assert "non-public address" in body["detail"]
            assert "MONOQUANT_WEBHOOK_ALLOW_PRIVATE" in body["suggestion"]
        assert http.get("/v1/jobs").json()["items"] == []
