"""The celery task's decisions, without worker processes: redelivery of an ended job, a job
another live worker holds, an orphaned "running" job, the solo-pool time limit.

Real Redis (an empty database, flushed afterwards) and a SQLite job store in a temp dir.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.exceptions import Retry

from app.config import Settings
from app.jobs import celery_queue
from app.jobs.celery_queue import _Lease, _run_task, _Watchdog, create_celery_app, sweep_orphans, time_limits
from app.jobs.store import JobRow, JobStore

pytestmark = pytest.mark.distributed


@pytest.fixture
def redis_db() -> int:
    redis = pytest.importorskip("redis")
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    for db in random.sample(range(1, 16), 15):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if client.dbsize() == 0 and client.set("monoquant-test:owner", "task-tests", nx=True):
            yield db
            client.flushdb()
            return
    pytest.skip("no empty Redis database (1..15)")


@pytest.fixture
def settings(tmp_path: Path, redis_db: int) -> Settings:
    return Settings(
        queue="celery",
        broker_url=f"redis://127.0.0.1:6379/{redis_db}",
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        max_attempts=2,
    )


@pytest.fixture
def store(settings: Settings) -> JobStore:
    store = celery_queue._store(settings.resolved_database_url)
    store.create_all()
    return store


def _job(store: JobStore, status: str = "queued", attempt: int = 0, worker: str | None = None) -> str:
    job = store.add_job(JobRow(owner="test", params={"bits": 8}))
    if status != "queued":
        store.claim(job.id, worker or "gone-host:1")
        for _ in range(attempt - 1):
            store.requeue(job.id, "test")
            store.claim(job.id, worker or "gone-host:1")
    if status in ("succeeded", "failed"):
        store.finish(job.id, status)
    return job.id


def _task(settings: Settings) -> SimpleNamespace:
    def retry(countdown: float) -> Retry:
        return Retry(when=countdown)

    return SimpleNamespace(app=SimpleNamespace(monoquant_settings=settings), retry=retry)


def test_time_limits_keep_visibility_above_the_hard_limit() -> None:
    for timeout in (1.0, 30.0, 3600.0, 86400.0):
        limits = time_limits(Settings(job_timeout_s=timeout))
        assert limits["soft"] == timeout < limits["hard"] < limits["visibility"]


def test_celery_app_settings_for_long_jobs(settings: Settings) -> None:
    conf = create_celery_app(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit


def test_celery_queue_needs_a_redis_broker(tmp_path: Path) -> None:
    from mono_quant.api.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="MONOQUANT_BROKER_URL"):
        create_celery_app(Settings(queue="celery", data_dir=tmp_path))


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_redelivered_ended_job_does_nothing(settings: Settings, store: JobStore, status: str) -> None:
    job_id = _job(store, status, attempt=1)
    assert _run_task(_task(settings), job_id) == status
    assert store.get_job(job_id).attempt == 1


def test_deleted_job_does_nothing(settings: Settings, store: JobStore) -> None:
    assert _run_task(_task(settings), "00000000-0000-0000-0000-000000000000") is None


def test_job_held_by_a_live_worker_is_retried_later(settings: Settings, store: JobStore) -> None:
    job_id = _job(store, "running", attempt=1, worker="other-host:7")
    holder = _Lease(settings, job_id)
    assert holder.acquire()
    with pytest.raises(Retry):
        _run_task(_task(settings), job_id)
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == ("running", 1)


def test_orphan_with_attempts_left_is_requeued_and_published(settings: Settings, store: JobStore) -> None:
    orphan = _job(store, "running", attempt=1)
    held = _job(store, "running", attempt=1, worker="other-host:8")
    assert _Lease(settings, held).acquire()
    published: list[str] = []
    assert sweep_orphans(settings, published.append) == [orphan] == published
    assert store.get_job(orphan).status == "queued"
    assert store.get_job(held).status == "running"
    assert "requeued" in [event.type for event in store.events(orphan)]


def test_orphan_without_attempts_left_fails_with_a_reason(settings: Settings, store: JobStore) -> None:
    orphan = _job(store, "running", attempt=2)
    assert sweep_orphans(settings, lambda job_id: None) == []
    job = store.get_job(orphan)
    assert job.status == "failed"
    assert job.error["type"] == "WorkerLost" and job.error["suggestion"]


def test_cancelled_orphan_ends_cancelled(settings: Settings, store: JobStore) -> None:
    orphan = _job(store, "running", attempt=1)
    store.request_cancel(orphan)
    sweep_orphans(settings, lambda job_id: None)
    assert store.get_job(orphan).status == "cancelled"


def test_watchdog_fails_a_job_past_its_time_limit(tmp_path: Path, settings: Settings, store: JobStore) -> None:
    quick = settings.model_copy(update={"job_timeout_s": 0.3})
    job_id = _job(store, "running", attempt=1, worker=celery_queue._worker_id())
    with _Watchdog(quick, store, job_id):  # leaves long before the hard limit (5 s later)
        deadline = time.monotonic() + 5
        while store.get_job(job_id).status == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    job = store.get_job(job_id)
    assert job.status == "failed"
    assert job.error["type"] == "JobTimeout" and "MONOQUANT_JOB_TIMEOUT_S" in job.error["suggestion"]
