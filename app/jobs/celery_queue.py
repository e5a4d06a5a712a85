"""The ``celery`` queue backend: jobs run on Celery workers, other machines included.

Layout (``MONOQUANT_QUEUE=celery``)::

    API replicas ──enqueue(job id)──▶ Redis (MONOQUANT_BROKER_URL) ──▶ workers: run_job(job id)
         │                                                                 │
         └──── read ────▶ PostgreSQL job store (MONOQUANT_DATABASE_URL) ◀── write (progress, events, end)
                          shared data_dir (uploads, artifacts) on a volume every node mounts

A worker is ``celery -A app.jobs.celery_queue worker --pool solo`` (see :data:`WORKER_COMMAND`):
one process, one job at a time, torch (and CUDA) in the main process, never in a forked child.
The message carries only the job id; the job store is the truth, so the task is idempotent:

* a job that already ended: nothing to do (a redelivered message is acknowledged and dropped);
* a job "queued": the runner claims it (queued -> running, next attempt) and runs it;
* a job "running": either another worker runs it right now (it holds the job's *lease*, a Redis
  key it refreshes every few seconds; we look again later) or its worker died (no lease): it is
  queued again while attempts are left (``max_attempts``), otherwise failed with a reason.

Messages are acknowledged late (after the job), one at a time per worker, so a worker killed in
the middle of a job leaves its message unacknowledged and Redis hands it to another worker after
the visibility timeout. Each worker also sweeps the store for "running" jobs without a lease and
recovers them at once (a dead worker is noticed in ~``_LEASE_TTL_S``, even if Redis lost the
message). Artifacts are written atomically by the runner and listed only when the job succeeds,
so a killed run never leaves a half-written artifact that could be served.

Time limits: a solo pool cannot kill its own task, so a watchdog thread does it: at
``job_timeout_s`` the job is failed (``JobTimeout``) and the runner stops at its next progress
report; if it is still busy ``_grace_s`` later, the worker process exits and its supervisor
(Docker's restart policy) starts a fresh one. The broker's visibility timeout is above that hard
limit, so a healthy long job is never handed to a second worker.

Cancel: the API flags the job row and revokes the message (a queued message is dropped by every
worker); a running job sees the flag between stages and inside the library's progress callback.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any

from celery import Celery, bootsteps

from app.config import Settings, get_settings
from app.jobs.lifecycle import fail_timed_out, recover_lost_job
from app.jobs.queue import register_queue
from app.jobs.store import TERMINAL, JobRow, JobStore
from mono_quant.errors import ConfigurationError

__all__ = [
    "TASK_NAME",
    "QUEUE_NAME",
    "WORKER_COMMAND",
    "WORKER_ALIVE_FILE",
    "CeleryQueue",
    "create_celery_app",
    "time_limits",
]

logger = logging.getLogger("app.queue.celery")

TASK_NAME = "monoquant.run_job"
QUEUE_NAME = "monoquant"
# The command a worker container runs (the Dockerfile, docker-compose.yml and the distributed
# tests use exactly this). One process per worker: scale with more workers, not --concurrency.
WORKER_COMMAND = (
    "celery",
    "-A",
    "app.jobs.celery_queue",
    "worker",
    "--pool",
    "solo",
    "--concurrency",
    "1",
    "--without-gossip",
    "--without-mingle",
    "--loglevel",
    "INFO",
)

# Touched every _SWEEP_S by a worker's sweep thread, which runs even while a job keeps the solo
# pool's main thread busy (so `celery inspect ping` would time out): the container healthcheck.
WORKER_ALIVE_FILE = Path(tempfile.gettempdir()) / "monoquant-worker.alive"
_LEASE_TTL_S = 20.0  # a worker silent this long is dead: its job may be taken over
_HEARTBEAT_S = 5.0
_SWEEP_S = 10.0
_REDIS_TIMEOUT_S = 5.0

# Compare-and-set scripts: a lease is only refreshed or released by the worker that holds it.
_REFRESH_LUA = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE_LUA = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def time_limits(settings: Settings) -> dict[str, float]:
    """Soft limit, hard limit and broker visibility timeout (seconds), all from ``job_timeout_s``.

    visibility > hard > soft: a message is only handed to a second worker once the first one
    has certainly stopped working on it.

    Example:
        >>> time_limits(Settings(job_timeout_s=3600))
        {'soft': 3600.0, 'hard': 3660.0, 'visibility': 3780.0}
    """
    soft = float(settings.job_timeout_s)
    grace = _grace_s(settings)
    return {"soft": soft, "hard": soft + grace, "visibility": soft + 3 * grace}


def _grace_s(settings: Settings) -> float:
    return min(60.0, max(5.0, 0.1 * float(settings.job_timeout_s)))


def _worker_id() -> str:
    # The same "host:pid" the runner writes into the job row when it claims a job.
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_key(job_id: str) -> str:
    return f"{QUEUE_NAME}:lease:{job_id}"


@lru_cache(maxsize=4)
def _store(database_url: str) -> JobStore:
    return JobStore(database_url)


@lru_cache(maxsize=4)
def _redis(broker_url: str) -> Any:
    import redis

    return redis.Redis.from_url(
        broker_url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S, health_check_interval=30
    )


def _check_settings(settings: Settings) -> str:
    broker_url = settings.broker_url
    if not broker_url or not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            f"MONOQUANT_QUEUE=celery needs a Redis MONOQUANT_BROKER_URL, got {broker_url!r}",
            suggestion="Set MONOQUANT_BROKER_URL=redis://host:6379/0 (the same value on the API and every worker).",
        )
    database_url = settings.resolved_database_url
    if database_url.startswith("sqlite"):
        logger.warning(
            "MONOQUANT_QUEUE=celery with a SQLite job store (%s): workers on other machines cannot reach it; "
            "set MONOQUANT_DATABASE_URL=postgresql+psycopg://... for a real deployment",
            database_url,
        )
    return broker_url


# -- the Celery application -------------------------------------------------------------------------


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``: the producer in the API, the consumer in a worker.

    Example:
        >>> app = create_celery_app(Settings(queue="celery", broker_url="redis://127.0.0.1:6379/0"))
        >>> app.conf.worker_prefetch_multiplier
        1
    """
    broker_url = _check_settings(settings)
    limits = time_limits(settings)
    restore_every = max(1.0, min(10.0, _grace_s(settings)))
    app = Celery("monoquant", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Above the hard limit: a running job's message is never handed to another worker.
            "visibility_timeout": limits["visibility"],
            # Look for messages of dead workers every few seconds (kombu's default is ~100 s).
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": 1,
            "socket_timeout": _REDIS_TIMEOUT_S * 2,
            "socket_connect_timeout": _REDIS_TIMEOUT_S,
        },
        # Publishing must not hang an HTTP request when Redis is down.
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        task_default_queue=QUEUE_NAME,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # Long, heavy jobs: take one message at a time, acknowledge it when the job is over, give
        # it back when the worker dies under it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Enforced by pools that can (prefork); the solo pool relies on the task's watchdog,
        # which acts first (at job_timeout_s) with a clear JobTimeout error.
        task_soft_time_limit=limits["soft"] + _grace_s(settings) / 2,
        task_time_limit=limits["hard"],
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.monoquant_settings = settings  # type: ignore[attr-defined]
    app.task(name=TASK_NAME, bind=True, max_retries=None)(_run_task)
    app.steps["worker"].add(_RecoveryStep)
    return app


def _run_task(task: Any, job_id: str) -> str | None:
    """The Celery task: run job ``job_id`` unless it ended or another live worker has it."""
    settings: Settings = task.app.monoquant_settings
    store = _store(settings.resolved_database_url)
    job = store.get_job(job_id)
    if job is None or job.status in TERMINAL:
        return job.status if job is not None else None  # deleted, or a redelivery of a finished job
    lease = _Lease(settings, job_id)
    if not lease.acquire():
        # Another worker runs it now. Look again once its lease could have lapsed: if that
        # worker finishes, the retry finds the job ended; if it dies, the retry takes over.
        raise task.retry(countdown=_LEASE_TTL_S)
    with lease:
        job = store.get_job(job_id)  # re-read: it may have changed before we held the lease
        if job is None or job.status in TERMINAL:
            return job.status if job is not None else None
        if job.status == "running" and not _recover(settings, store, job, "its worker stopped while running it"):
            ended = store.get_job(job_id)
            return ended.status if ended is not None else None
        from app.jobs.runner import run_job

        with _Watchdog(settings, store, job_id):
            return run_job(job_id, settings)


def _recover(settings: Settings, store: JobStore, job: JobRow, reason: str) -> bool:
    """A "running" job nobody runs (its worker died): the lifecycle rules decide (queued again,
    cancelled or failed). True when the job is queued again. Call it holding the job's lease."""
    from app.jobs.runner import notify_job_end

    outcome = recover_lost_job(settings, store, job, reason)
    if outcome in ("failed", "cancelled"):
        notify_job_end(settings, store, job.id)
    return outcome == "queued"


class _Lease:
    """``<queue>:lease:<job id>`` in Redis while this worker works on the job, refreshed by a
    heartbeat thread; it vanishes ``_LEASE_TTL_S`` after the worker dies."""

    def __init__(self, settings: Settings, job_id: str) -> None:
        self.redis = _redis(settings.broker_url)
        self.key = _lease_key(job_id)
        self.token = f"{_worker_id()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.token, nx=True, px=int(_LEASE_TTL_S * 1000)))

    def _beat(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                self.redis.eval(_REFRESH_LUA, 1, self.key, self.token, int(_LEASE_TTL_S * 1000))
            except Exception:  # a Redis hiccup: the next beat tries again; the store guards the outcome
                logger.warning("could not refresh %s", self.key, exc_info=True)

    def __enter__(self) -> _Lease:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="monoquant-lease")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_REDIS_TIMEOUT_S)
        try:
            self.redis.eval(_RELEASE_LUA, 1, self.key, self.token)
        except Exception:  # it expires on its own
            logger.warning("could not release %s", self.key, exc_info=True)


class _Watchdog:
    """Time limits for a solo pool: fail the job at the soft limit (the runner stops at its next
    progress report), end the worker process at the hard limit."""

    def __init__(self, settings: Settings, store: JobStore, job_id: str) -> None:
        self.settings = settings
        self.store = store
        self.job_id = job_id
        self.worker = _worker_id()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="monoquant-watchdog")

    def _watch(self) -> None:
        limits = time_limits(self.settings)
        if self._done.wait(limits["soft"]):
            return
        job = self.store.get_job(self.job_id)
        if job is not None and job.worker == self.worker and fail_timed_out(self.settings, self.store, job):
            logger.error("job %s: time limit of %g s reached, failed", self.job_id, limits["soft"])
            from app.jobs.runner import notify_job_end

            notify_job_end(self.settings, self.store, self.job_id)
        if self._done.wait(limits["hard"] - limits["soft"]):
            return
        # Stuck inside one long operation: only ending the process stops it. The message is
        # unacknowledged; its redelivery finds the job failed and does nothing.
        logger.critical("job %s: hard time limit of %g s reached; worker exits", self.job_id, limits["hard"])
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._done.set()


# -- the worker's recovery sweep --------------------------------------------------------------------


def sweep_orphans(settings: Settings, publish: Any) -> list[str]:
    """Recover "running" jobs that no live worker holds a lease on. Returns the ids queued
    again (each also published with ``publish(job_id)``)."""
    store = _store(settings.resolved_database_url)
    client = _redis(settings.broker_url)
    requeued = []
    for job in store.running_jobs():
        # A job this very process runs is not orphaned, even if a long stall (GIL, swap) let
        # its lease lapse; neither is one whose worker still refreshes its lease.
        if job.worker == _worker_id() or client.exists(_lease_key(job.id)):
            continue
        lease = _Lease(settings, job.id)
        if not lease.acquire():
            continue
        try:
            current = store.get_job(job.id)
            if current is None or current.status != "running":
                continue
            if _recover(settings, store, current, "its worker stopped sending heartbeats"):
                publish(job.id)
                requeued.append(job.id)
        finally:
            lease.__exit__(None, None, None)
    return requeued


class _RecoveryStep(bootsteps.StartStopStep):
    """Worker boot step: sweeps for orphaned jobs every ``_SWEEP_S`` in a thread (the solo
    pool's main thread is busy running jobs). The API creates the tables; workers start after it."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.monoquant_settings

        def publish(job_id: str) -> None:
            worker.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE_NAME)

        def loop() -> None:
            WORKER_ALIVE_FILE.touch()
            while not self._stop.wait(_SWEEP_S):
                try:
                    sweep_orphans(settings, publish)
                    WORKER_ALIVE_FILE.touch()
                except Exception:  # a store or broker hiccup: sweep again next time
                    logger.warning("orphan sweep failed", exc_info=True)

        self._thread = threading.Thread(target=loop, daemon=True, name="monoquant-sweep")
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()


# -- the API side -----------------------------------------------------------------------------------


@register_queue("celery")
class CeleryQueue:
    """Queue backend of the API process: publishes job ids, revokes cancelled ones. Workers
    run the jobs; this process never does."""

    name = "celery"

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.celery = create_celery_app(settings)

    def start(self) -> None:
        # A job inserted just before the previous API process died may have no message yet.
        # Publishing every queued job again is safe: the task does nothing for a job that
        # has been taken or has ended.
        try:
            queued = self.store.queued_job_ids(100_000)
            for job_id in queued:
                self.enqueue(job_id)
            if queued:
                logger.info("published %d queued job(s) again at startup", len(queued))
        except Exception:  # the broker may come up later; jobs stay queued in the store
            logger.warning("could not publish queued jobs at startup", exc_info=True)

    def stop(self) -> None:
        self.celery.close()

    def enqueue(self, job_id: str) -> None:
        # The task id is the job id: revoking a job's id drops every message for it.
        try:
            self.celery.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE_NAME)
        except Exception:  # the job is safe in the store: the next API start publishes it again
            logger.error("could not publish job %s (broker unreachable?); it stays queued", job_id, exc_info=True)

    def cancel(self, job_id: str) -> None:
        # The store already flags the job: a running worker sees it between stages. Revoking
        # makes every worker drop a message of this job it has not started yet.
        try:
            self.celery.control.revoke(job_id)
        except Exception:
            logger.warning("could not revoke job %s (the cancel flag still applies)", job_id, exc_info=True)

    def ready(self) -> bool:
        try:
            return bool(_redis(self.settings.broker_url).ping())
        except Exception:
            return False

    def stats(self) -> dict[str, int]:
        try:
            client = _redis(self.settings.broker_url)
            # kombu keeps one list per priority step: "<queue>" and "<queue>\x06\x16<n>"
            keys = [QUEUE_NAME] + [f"{QUEUE_NAME}\x06\x16{step}" for step in (3, 6, 9)]
            return {"queue_length": int(sum(client.llen(key) for key in keys))}
        except Exception:
            return {"queue_length": -1}


def __getattr__(name: str) -> Any:
    # ``celery -A app.jobs.celery_queue worker`` looks for ``app``: the worker's application,
    # configured from the environment (MONOQUANT_*) when the worker asks for it, not at import.
    if name in ("app", "celery"):
        return _worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=1)
def _worker_app() -> Celery:
    return create_celery_app(get_settings())
