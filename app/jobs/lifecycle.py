"""The job lifecycle rules both queue backends apply, and the job errors they record.

A job moves ``queued -> running -> succeeded | failed | cancelled`` (the store makes each step
a conditional update). What the queues decide on their own, the rules here decide once:

* a running job whose worker is gone (crashed, killed, its machine lost) is cancelled if
  cancellation was asked, queued again while it has attempts left (``max_attempts``), and
  otherwise failed with :func:`worker_lost_error`;
* a job running past ``job_timeout_s`` is failed with :func:`timeout_error`.

The embedded pool and the Celery workers only detect those situations (a dead child process,
a missing lease, a watchdog) and call in here; they never restate the rules.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from app.config import Settings
from app.jobs.store import JobRow, JobStore

__all__ = ["Recovery", "timeout_error", "worker_lost_error", "recover_lost_job", "fail_timed_out"]

logger = logging.getLogger("app.lifecycle")

# What recover_lost_job did: the job's new status, or "unchanged" (it was not running any more).
Recovery = Literal["queued", "failed", "cancelled", "unchanged"]

_WORKER_LOST_SUGGESTION = (
    "Submit the job again. If it keeps failing, the model may exhaust the worker's memory: "
    "try a smaller model, or ask the operator for a bigger worker."
)


def timeout_error(settings: Settings) -> dict[str, Any]:
    """The error of a job stopped at ``job_timeout_s``."""
    return {
        "type": "JobTimeout",
        "message": f"the job ran longer than {settings.job_timeout_s:g} s and was stopped",
        "suggestion": "Quantize a smaller model or fewer calibration samples, "
        "or ask the operator to raise MONOQUANT_JOB_TIMEOUT_S.",
    }


def worker_lost_error(reason: str, attempts: int) -> dict[str, Any]:
    """The error of a job whose worker was lost on its last allowed attempt."""
    return {
        "type": "WorkerLost",
        "message": f"the job was interrupted: {reason}, after {attempts} attempt(s)",
        "suggestion": _WORKER_LOST_SUGGESTION,
    }


def recover_lost_job(settings: Settings, store: JobStore, job: JobRow, reason: str) -> Recovery:
    """Apply the rules to a running job whose worker is gone; returns what was done.

    ``reason`` says what happened, for the event and the error ("its worker process exited
    unexpectedly (exit code -9)"). The worker's host:pid goes to the log, not to the job.

    Example:
        >>> recover_lost_job(settings, store, job, "its worker process is gone")  # doctest: +SKIP
        'queued'
    """
    if job.status != "running":
        return "unchanged"
    if job.cancel_requested:
        return "cancelled" if store.finish(job.id, "cancelled", attempt=job.attempt) else "unchanged"
    if job.attempt < settings.max_attempts:
        logger.warning("job %s: %s (worker %s); queued again after attempt %d", job.id, reason, job.worker, job.attempt)
        return "queued" if store.requeue(job.id, f"{reason}; retrying") else "unchanged"
    logger.warning("job %s: %s (worker %s); no attempts left, failed", job.id, reason, job.worker)
    error = worker_lost_error(reason, job.attempt)
    return "failed" if store.finish(job.id, "failed", attempt=job.attempt, error=error) else "unchanged"


def fail_timed_out(settings: Settings, store: JobStore, job: JobRow) -> bool:
    """Fail a job that ran past ``job_timeout_s`` (this attempt only). True when it was failed."""
    if job.status != "running":
        return False
    return store.finish(job.id, "failed", attempt=job.attempt, error=timeout_error(settings))
