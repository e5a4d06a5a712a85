"""Queue backends behind a small registry.

A backend takes job ids and makes sure ``app.jobs.runner.run_job(job_id, settings)`` is
called for each, somewhere. ``embedded`` (default) runs them in spawned child processes of
the API server. A ``celery`` backend plugs in by registering itself under that name:

    @register_queue("celery")
    class CeleryQueue:
        def __init__(self, settings, store): ...
        def start(self): ...              # nothing to start in the API process
        def stop(self): ...
        def enqueue(self, job_id): run_job_task.delay(job_id)   # the task calls run_job()
        def cancel(self, job_id): app.control.revoke(task_id, terminate=True)
        def ready(self): ...              # broker reachable
        def stats(self): ...

and importing its module from :data:`_BACKEND_MODULES`. The job store does the rest: the
runner claims each job atomically, so redelivered messages never run a job twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from app.config import Settings
from app.jobs.store import JobStore
from mono_quant.errors import ConfigurationError

__all__ = ["QueueBackend", "register_queue", "create_queue", "QUEUE_BACKENDS"]


class QueueBackend(Protocol):
    name: str

    def start(self) -> None:
        """Begin processing (also: recover jobs a previous server left running)."""

    def stop(self) -> None:
        """Stop processing; running jobs are interrupted and will run again after a restart."""

    def enqueue(self, job_id: str) -> None:
        """A job was queued in the store: run it when a worker is free."""

    def cancel(self, job_id: str) -> None:
        """The job was flagged cancel_requested: stop it now if it is running."""

    def ready(self) -> bool:
        """True when jobs can be taken (readiness probe)."""

    def stats(self) -> dict[str, int]:
        """Numbers for /metrics: workers, busy, ..."""


QueueFactory = Callable[[Settings, JobStore], QueueBackend]
QUEUE_BACKENDS: dict[str, QueueFactory] = {}
# Backends that live in their own module and register themselves when imported.
_BACKEND_MODULES = {"embedded": "app.jobs.embedded", "celery": "app.jobs.celery_queue"}


def register_queue(name: str) -> Callable[[QueueFactory], QueueFactory]:
    def decorator(factory: QueueFactory) -> QueueFactory:
        QUEUE_BACKENDS[name] = factory
        return factory

    return decorator


def create_queue(settings: Settings, store: JobStore) -> QueueBackend:
    """The backend named by ``settings.queue``."""
    name = settings.queue
    if name not in QUEUE_BACKENDS and name in _BACKEND_MODULES:
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except ModuleNotFoundError as exc:
            if exc.name != _BACKEND_MODULES[name]:
                raise
    if name not in QUEUE_BACKENDS:
        raise ConfigurationError(
            f"queue backend {name!r} is not available in this installation",
            suggestion=f"Set MONOQUANT_QUEUE to one of: {', '.join(sorted(QUEUE_BACKENDS) or ['embedded'])}.",
        )
    return QUEUE_BACKENDS[name](settings, store)
