"""The embedded queue: a pool of worker processes (``spawn``) supervised by a thread.

Each worker is a long-lived child process that receives job ids over a pipe and calls
:func:`app.jobs.runner.run_job`; torch is imported once per worker, not once per job.
The supervisor thread in the API process:

* hands queued jobs to idle workers (starting a worker when one is needed);
* cancels: a running job flagged ``cancel_requested`` has its worker terminated (and a
  fresh worker started on demand), then is marked cancelled;
* enforces ``job_timeout_s`` the same way;
* recovers: a job found "running" whose worker process is gone (the worker crashed, or
  the whole server was killed and restarted) goes to :mod:`app.jobs.lifecycle`, which
  queues it again while it has attempts left, otherwise fails it with a reason saying so.
  Never "running" forever.

Workers exit on their own when the API process dies (they watch their parent), so a killed
server leaves no orphan that could finish a job another run has taken over; even then the
store's attempt check would discard the orphan's writes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from app.config import Settings
from app.jobs.lifecycle import fail_timed_out, recover_lost_job
from app.jobs.queue import register_queue
from app.jobs.store import JobRow, JobStore

__all__ = ["EmbeddedQueue"]

logger = logging.getLogger("app.queue")
_PARENT_WATCH_S = 0.5
_SWEEP_S = 2.0
_STOP_GRACE_S = 5.0


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_PARENT_WATCH_S)
        if os.getppid() != parent_pid:
            os._exit(3)  # the API server is gone: stop now, the job will be recovered


def _worker_main(settings: Settings, conn: Connection, parent_pid: int) -> None:
    """Entry point of a worker process."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s [worker] %(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    from app.jobs.runner import run_job

    while True:
        try:
            job_id = conn.recv()
        except (EOFError, OSError):
            return
        if job_id is None:
            return
        try:
            run_job(job_id, settings)
        except Exception:  # run_job ends jobs itself; this is a store outage or similar
            logger.exception("worker failed to run job %s", job_id)
        try:
            conn.send(job_id)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    job_id: str | None = None
    since: float = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@register_queue("embedded")
class EmbeddedQueue:
    """Runs jobs in ``settings.workers`` spawned child processes."""

    name = "embedded"

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.host = socket.gethostname()
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(settings.workers)]
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0

    # -- QueueBackend -----------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()  # start after stop (an app restarted in the same process)
        self._sweep(startup=True)
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="monoquant-supervisor")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for slot in self._slots:
            interrupted = slot.job_id
            self._stop_worker(slot, graceful=True)
            if interrupted is not None:
                self.store.requeue(interrupted, "the server shut down while the job ran; it runs again at restart")

    def enqueue(self, job_id: str) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._wake.set()

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def stats(self) -> dict[str, int]:
        return {
            "workers": len(self._slots),
            "workers_alive": sum(slot.alive for slot in self._slots),
            "workers_busy": sum(slot.job_id is not None for slot in self._slots),
        }

    # -- supervisor -------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must survive a store hiccup
                logger.exception("queue supervisor error")
            self._wake.wait(self.settings.dispatch_interval_s)
            self._wake.clear()

    def _tick(self) -> None:
        self._collect_finished()
        self._enforce_cancel_and_timeout()
        if time.monotonic() - self._last_sweep >= _SWEEP_S:
            self._sweep()
        self._dispatch()

    def _collect_finished(self) -> None:
        for slot in self._slots:
            if slot.job_id is None:
                continue
            if slot.conn is not None and slot.conn.poll():
                try:
                    slot.conn.recv()
                except (EOFError, OSError):
                    pass
                slot.job_id = None
            elif not slot.alive:
                lost = slot.job_id
                exitcode = slot.process.exitcode if slot.process is not None else None
                slot.job_id = None
                self._cleanup(slot)
                self._recover(lost, f"its worker process exited unexpectedly (exit code {exitcode})")

    def _enforce_cancel_and_timeout(self) -> None:
        busy = {slot.job_id: slot for slot in self._slots if slot.job_id is not None}
        if not busy:
            return
        now = time.monotonic()
        for job_id, slot in busy.items():
            job = self.store.get_job(job_id)
            if job is None or (job.cancel_requested and job.status == "running"):
                self._stop_worker(slot, graceful=False)
                slot.job_id = None
                if job is not None and self.store.finish(job_id, "cancelled"):
                    self._notify(job_id)
            elif job.status == "running" and now - slot.since > self.settings.job_timeout_s:
                self._stop_worker(slot, graceful=False)
                slot.job_id = None
                if fail_timed_out(self.settings, self.store, job):
                    self._notify(job_id)

    def _dispatch(self) -> None:
        idle = [slot for slot in self._slots if slot.job_id is None]
        if not idle:
            return
        in_flight = {slot.job_id for slot in self._slots if slot.job_id is not None}
        candidates = [
            job_id for job_id in self.store.queued_job_ids(len(idle) + len(in_flight)) if job_id not in in_flight
        ]
        for slot, job_id in zip(idle, candidates, strict=False):
            if not slot.alive:
                self._start_worker(slot)
            assert slot.conn is not None
            try:
                slot.conn.send(job_id)
            except (BrokenPipeError, OSError):
                self._cleanup(slot)
                continue
            slot.job_id = job_id
            slot.since = time.monotonic()

    def _sweep(self, startup: bool = False) -> None:
        """Recover running jobs whose worker process no longer exists."""
        self._last_sweep = time.monotonic()
        ours = {slot.job_id for slot in self._slots if slot.job_id is not None}
        for job in self.store.running_jobs():
            if job.id in ours or not self._worker_gone(job):
                continue
            reason = (
                "the server stopped while the job ran (found running at startup)"
                if startup
                else "its worker process is gone"
            )
            self._recover(job.id, reason)

    def _worker_gone(self, job: JobRow) -> bool:
        host, _, pid = (job.worker or "").rpartition(":")
        if host != self.host or not pid.isdigit():
            # Another machine's worker (a shared store): only its own server can tell. The
            # job timeout still applies to it via started_at.
            started = job.started_at.timestamp() if job.started_at else 0.0
            return time.time() - started > self.settings.job_timeout_s * 2
        return not _pid_alive(int(pid))

    def _recover(self, job_id: str, reason: str) -> None:
        job = self.store.get_job(job_id)
        if job is None:
            return
        outcome = recover_lost_job(self.settings, self.store, job, reason)
        if outcome == "queued":
            self._wake.set()
        elif outcome in ("failed", "cancelled"):
            self._notify(job_id)

    # -- worker processes -------------------------------------------------------------------------
    def _start_worker(self, slot: _Slot) -> None:
        self._cleanup(slot)
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(self.settings, child_conn, os.getpid()),
            name=f"monoquant-worker-{slot.index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        slot.process, slot.conn = process, parent_conn

    def _stop_worker(self, slot: _Slot, graceful: bool) -> None:
        process = slot.process
        if process is None:
            return
        if graceful and slot.job_id is None and slot.conn is not None:
            try:
                slot.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(_STOP_GRACE_S)
        if process.is_alive():
            process.terminate()
            process.join(_STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(_STOP_GRACE_S)
        self._cleanup(slot)

    @staticmethod
    def _cleanup(slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.close()
        if slot.process is not None and not slot.process.is_alive():
            slot.process.close()
        slot.process, slot.conn = None, None

    def _notify(self, job_id: str) -> None:
        from app.jobs.runner import notify_job_end

        threading.Thread(
            target=notify_job_end, args=(self.settings, self.store, job_id), daemon=True, name="webhook"
        ).start()
