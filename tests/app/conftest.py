"""Fixtures for the service tests: real apps over HTTP (httpx via Starlette's TestClient).

Job-running apps spawn worker processes (a few seconds each, torch is imported), so one
module-wide ``service`` is shared by most tests; tests that need other settings build their
own with ``make_service``, and tests that must see jobs stay queued use ``paused_service``
(the app without its lifespan: no worker pool, so nothing runs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.client import MonoQuantClient
from app.config import Settings
from app.main import create_app

# Worker processes unpickle test-only modules (tests.app.slow_model) by name; spawned workers
# inherit sys.path, so put the repository on it.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def settings_for(data_dir: Path, **overrides) -> Settings:
    """Fast-polling settings for tests (the environment is ignored)."""
    values = {"data_dir": data_dir, "dispatch_interval_s": 0.05, "workers": 1, **overrides}
    return Settings(**values)


@contextmanager
def running_service(data_dir: Path, **overrides) -> Iterator[TestClient]:
    """An app with its lifespan (worker pool) running, and a TestClient on it."""
    app = create_app(settings_for(data_dir, **overrides))
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[TestClient]:
    """A running service shared by a test module (2 workers)."""
    with running_service(tmp_path_factory.mktemp("service"), workers=2) as http:
        yield http


@pytest.fixture
def client(service) -> MonoQuantClient:
    return MonoQuantClient(http=service)


@pytest.fixture
def make_service(tmp_path):
    """``with make_service(api_keys="a,b") as http:`` - a service with other settings."""
    counter = iter(range(100))

    @contextmanager
    def factory(**overrides) -> Iterator[TestClient]:
        with running_service(tmp_path / f"svc{next(counter)}", **overrides) as http:
            yield http

    return factory


@contextmanager
def paused(data_dir: Path, **overrides) -> Iterator[TestClient]:
    """An app without its lifespan (no worker pool, so nothing runs), and a TestClient on it."""
    app = create_app(settings_for(data_dir, **overrides))
    context = app.state.context
    context.storage.ensure()
    context.store.create_all()
    http = TestClient(app, raise_server_exceptions=False)  # no `with`: the lifespan does not run
    try:
        yield http
    finally:
        http.close()
        context.store.dispose()


@pytest.fixture
def paused_service(tmp_path) -> Iterator[TestClient]:
    """A service whose worker pool is not running: submitted jobs stay queued."""
    with paused(tmp_path / "paused") as http:
        yield http


@pytest.fixture
def make_paused_service(tmp_path):
    """``with make_paused_service(api_keys="a,b") as http:`` - a paused service with other settings."""
    counter = iter(range(100))

    def factory(**overrides):
        return paused(tmp_path / f"paused{next(counter)}", **overrides)

    return factory


def tiny_state_dict(seed: int = 0, width: int = 128) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 64))
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A small MLP's state_dict as safetensors (int4-compatible: in_features 128)."""
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_file(tiny_state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def slow_job(tmp_path_factory) -> tuple[dict, dict]:
    """``(files, data)`` of a job that runs for about 10 s whatever the machine: static int8
    of a pickled :class:`SlowModel` (0.25 s per forward) over 40 calibration batches. Needs a
    service with ``trusted_inputs=True`` (the model is a pickled module)."""
    from tests.app.slow_model import CALIBRATION_ROWS, FEATURES, SlowModel

    folder = tmp_path_factory.mktemp("slow")
    torch.manual_seed(1)
    torch.save(SlowModel(), folder / "slow.pt")
    save_file({"input": torch.randn(CALIBRATION_ROWS, FEATURES)}, str(folder / "calibration.safetensors"))
    files = {
        "model": ("slow.pt", (folder / "slow.pt").read_bytes(), "application/octet-stream"),
        "calibration": (
            "calibration.safetensors",
            (folder / "calibration.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }
    data = {"bits": "8", "dynamic": "false", "num_calibration_samples": str(CALIBRATION_ROWS)}
    return files, data


def upload(path: Path, name: str | None = None) -> dict:
    return {"model": (name or path.name, path.read_bytes(), "application/octet-stream")}


def wait_for(http: TestClient, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120.0):
    """Poll a job until its status is in ``statuses``; returns the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.05)


def run_to_report(http: TestClient, files: dict, data: dict, timeout: float = 300.0) -> tuple[dict, dict]:
    """Submit a quantize job, wait for it to succeed, return ``(job, report.json)``."""
    response = http.post("/v1/quantize", files=files, data=data)
    assert response.status_code == 202, response.text
    job = wait_for(http, response.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", job["error"]
    return job, http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()


def assert_problem(response, status: int, type_name: str) -> dict:
    """The response is problem+json with this status and type; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["type"] == f"/problems/{type_name}"
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body
