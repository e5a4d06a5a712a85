"""The objects one running service shares: settings, store, storage, queue, metrics."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from app.config import Settings
from app.jobs.queue import QueueBackend, create_queue
from app.jobs.store import JobStore
from app.metrics import ServiceMetrics
from app.storage import Storage

__all__ = ["ServiceContext"]

logger = logging.getLogger("app")


@dataclass
class ServiceContext:
    settings: Settings
    store: JobStore
    storage: Storage
    queue: QueueBackend
    metrics: ServiceMetrics = field(init=False)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _janitor: threading.Thread | None = field(init=False, default=None)

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.resolved_database_url)
        return cls(
            settings=settings, store=store, storage=Storage(settings.data_dir), queue=create_queue(settings, store)
        )

    def __post_init__(self) -> None:
        self.metrics = ServiceMetrics(self.store, self.queue)

    def sweep_partial_writes(self) -> int:
        """Remove partial writes untouched for ``temp_max_age_s`` (a live write touches its
        file at every chunk; one that stopped belongs to a process that died, a kill -9)."""
        removed = self.storage.sweep_temp(older_than_s=self.settings.temp_max_age_s)
        if removed:
            logger.info("removed %d partial writes left by dead processes", removed)
        return removed

    def _sweep_periodically(self) -> None:
        while not self._stopping.wait(self.settings.temp_sweep_interval_s):
            try:
                self.sweep_partial_writes()
            except OSError:  # a storage hiccup must not end the sweeper
                logger.exception("sweeping partial writes failed")

    def start(self) -> None:
        self.storage.ensure()
        self.sweep_partial_writes()
        self._stopping.clear()
        self._janitor = threading.Thread(target=self._sweep_periodically, name="monoquant-sweeper", daemon=True)
        self._janitor.start()
        self.store.create_all()
        if not self.settings.api_keys:
            logger.warning(
                "no API keys configured (MONOQUANT_API_KEYS): the service is open to anyone who can reach it; "
                "use this for local development only"
            )
        self.queue.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._janitor is not None:
            self._janitor.join(timeout=5)
        self.queue.stop()
        self.store.dispose()
