"""The celery queue end to end: 20 jobs over two workers, cancel across processes, a worker
killed mid-job and an API restart, with every artifact downloaded and checked.

The tests share one cluster (``conftest.cluster``) and run in file order: the last one kills
a worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mono_quant
from app.client import MonoQuantClient
from app.jobs.store import JobStore
from tests.app.slow_model import CALIBRATION_ROWS, FEATURES, SlowModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

_TERMINAL = ("succeeded", "failed", "cancelled")
# Output cosine vs fp32 floors of the small models (a stated tolerance, not exact equality).
_COSINE_FLOOR = {8: 0.99, 4: 0.95}


def _mlp(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index in range(depth):
        layers.append(nn.Linear(width, width))
        if index < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _save(model: nn.Module, path: Path) -> Path:
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, path)
    return path


def _params(bits: int) -> dict:
    return {"bits": 8, "dynamic": True} if bits == 8 else {"bits": 4, "group_size": 32}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_all(client: MonoQuantClient, job_ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        jobs = {job_id: client.get_job(job_id) for job_id in job_ids}
        if all(job["status"] in _TERMINAL for job in jobs.values()):
            return jobs
        time.sleep(0.5)
    pending = {job_id: job["status"] for job_id, job in jobs.items() if job["status"] not in _TERMINAL}
    raise AssertionError(f"jobs not finished after {timeout} s: {pending}")


def _check_artifacts(client: MonoQuantClient, job: dict, model: nn.Module, bits: int, out_dir: Path) -> None:
    """Download both artifacts (the client checks sha256 against the listing), compare with the
    file on the shared volume, load the model and compare its output with the fp32 model."""
    listing = {artifact["name"]: artifact for artifact in client.artifacts(job["id"])}
    assert set(listing) == {"model.safetensors", "report.json"}
    target = client.download(job["id"], "model.safetensors", out_dir / f"{job['id']}.safetensors")
    assert _sha256(target) == listing["model.safetensors"]["sha256"]
    report_path = client.download(job["id"], "report.json", out_dir / f"{job['id']}.json")
    report = json.loads(report_path.read_text())
    assert report["job_id"] == job["id"]
    assert report["model_sha256"] == listing["model.safetensors"]["sha256"]

    if isinstance(model, SlowModel):
        in_features, skeleton = FEATURES, SlowModel(delay_s=0.0)
    else:
        in_features = model[0].in_features
        skeleton = _mlp(in_features, len([m for m in model if isinstance(m, nn.Linear)]), seed=99)
    inputs = torch.randn(16, in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs)
        quantized = mono_quant.load_quantized(target, skeleton)
        actual = quantized(inputs)
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0).item()
    assert cosine >= _COSINE_FLOOR[bits], f"job {job['id']} (int{bits}): output cosine {cosine:.4f}"


def _artifacts_on_disk_match(cluster, client: MonoQuantClient, job_ids: list[str]) -> None:
    """No corrupt artifact on the shared volume: each file's sha256 is the one the API lists."""
    for job_id in job_ids:
        for artifact in client.artifacts(job_id):
            path = cluster.data_dir / "artifacts" / job_id.replace("-", "") / artifact["name"]
            assert _sha256(path) == artifact["sha256"], f"{path} does not match its listed sha256"


def _worker_pids(cluster, job_id: str) -> list[int]:
    """The pid of each run, in order: "running" events keep ``host:pid`` in the store (tenants'
    events over the API leave it out)."""
    store = JobStore(cluster.env["MONOQUANT_DATABASE_URL"])
    try:
        runs = [event for event in store.events(job_id) if event.type == "running"]
    finally:
        store.dispose()
    return [int(event.data["worker"].rsplit(":", 1)[1]) for event in runs]


def _wait_running(client: MonoQuantClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job["status"] == "running":
            return job
        assert job["status"] == "queued", job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start within {timeout} s")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    root = tmp_path_factory.mktemp("models")
    specs = {"small": (64, 2, 1), "medium": (128, 3, 2)}
    built = {}
    for name, (width, depth, seed) in specs.items():
        model = _mlp(width, depth, seed)
        built[name] = (model, _save(model, root / f"{name}.safetensors"))
    # A job that runs ~10 s whatever the machine (to cancel it or kill its worker mid-run):
    # static int8 of a pickled model whose forward sleeps, over 40 calibration batches.
    torch.manual_seed(3)
    slow = SlowModel(delay_s=0.25).eval()
    torch.save(slow, root / "slow.pt")
    save_file({"input": torch.randn(CALIBRATION_ROWS, FEATURES)}, root / "calibration.safetensors")
    built["slow"] = (slow, root / "slow.pt")
    return built


def _submit_slow(client: MonoQuantClient, models: dict) -> dict:
    calibration = models["slow"][1].with_name("calibration.safetensors")
    return client.submit(
        models["slow"][1], calibration=calibration, bits=8, dynamic=False, num_calibration_samples=CALIBRATION_ROWS
    )


def test_twenty_jobs_over_two_workers_all_succeed(cluster, models, tmp_path: Path) -> None:
    submitted = []
    with MonoQuantClient(cluster.api_url, timeout=60) as client:
        for index in range(20):
            name = "small" if index % 2 else "medium"
            bits = 8 if index % 4 < 2 else 4
            job = client.submit(models[name][1], **_params(bits))
            assert job["status"] == "queued"
            submitted.append((job["id"], name, bits))
        jobs = _wait_all(client, [job_id for job_id, _, _ in submitted], timeout=150)

        failed = {job_id: job["error"] for job_id, job in jobs.items() if job["status"] != "succeeded"}
        assert not failed
        for job_id, name, bits in submitted:
            assert jobs[job_id]["attempt"] == 1
            assert jobs[job_id]["progress"] == {"stage": "done", "fraction": 1.0}
            _check_artifacts(client, jobs[job_id], models[name][0], bits, tmp_path)
        # both workers took jobs, and each job ran exactly once
        pids = [_worker_pids(cluster, job_id) for job_id, _, _ in submitted]
        assert all(len(runs) == 1 for runs in pids)
        assert {runs[0] for runs in pids} == {process.pid for process in cluster.workers.values()}
        _artifacts_on_disk_match(cluster, client, [job_id for job_id, _, _ in submitted])


def test_cancel_reaches_the_worker_running_the_job(cluster, models) -> None:
    with MonoQuantClient(cluster.api_url, timeout=60) as client:
        job = _submit_slow(client, models)
        _wait_running(client, job["id"])
        answer = client.cancel(job["id"])
        assert answer["cancel_requested"] is True
        ended = _wait_all(client, [job["id"]], timeout=60)[job["id"]]
        assert ended["status"] == "cancelled"
        assert ended["artifacts"] == []
        assert not (cluster.data_dir / "artifacts" / job["id"].replace("-", "") / "model.safetensors").exists()


def test_killed_worker_and_restarted_api_lose_nothing(cluster, models, tmp_path: Path) -> None:
    client = MonoQuantClient(cluster.api_url, timeout=60)
    slow = _submit_slow(client, models)
    others = [client.submit(models["small"][1], **_params(8 if index % 2 else 4)) for index in range(4)]
    _wait_running(client, slow["id"])
    [victim_pid] = _worker_pids(cluster, slow["id"])
    victim = cluster.worker_by_pid(victim_pid)
    time.sleep(0.5)  # well inside the job (it calibrates for ~10 s)
    os.kill(victim_pid, signal.SIGKILL)
    cluster.workers[victim].wait(10)
    assert client.get_job(slow["id"])["status"] == "running"  # its worker is dead: nobody ends it...

    # ...while the API goes down hard and comes back (possibly on another port)
    cluster.kill_api()
    client.close()
    cluster.start_api("api-restarted")
    client = MonoQuantClient(cluster.api_url, timeout=60)
    later = [client.submit(models["medium"][1], **_params(8)) for _ in range(2)]

    spec = {slow["id"]: ("slow", 8)}
    spec.update({job["id"]: ("small", 8 if index % 2 else 4) for index, job in enumerate(others)})
    spec.update({job["id"]: ("medium", 8) for job in later})
    all_ids = list(spec)
    jobs = _wait_all(client, all_ids, timeout=120)
    failed = {job_id: (job["status"], job["error"]) for job_id, job in jobs.items() if job["status"] != "succeeded"}
    assert not failed, {job_id: (state, client.events(job_id)) for job_id, state in failed.items()}

    # the interrupted job ran again, on the surviving worker, as attempt 2
    survivor = next(process.pid for name, process in cluster.workers.items() if name != victim)
    assert jobs[slow["id"]]["attempt"] == 2
    assert _worker_pids(cluster, slow["id"]) == [victim_pid, survivor]
    assert "requeued" in [event["type"] for event in client.events(slow["id"])]
    for job_id, job in jobs.items():
        name, bits = spec[job_id]
        _check_artifacts(client, job, models[name][0], bits, tmp_path)
    _artifacts_on_disk_match(cluster, client, all_ids)

    # The dead worker's message comes back from Redis after the visibility timeout and is
    # acknowledged without running the job again.
    deadline = time.monotonic() + 90
    while cluster.redis.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(1)
    assert cluster.redis.hlen("unacked") == 0
    assert client.get_job(slow["id"])["attempt"] == 2
    assert client.list_jobs(status=["queued", "running"])["items"] == []
    client.close()
