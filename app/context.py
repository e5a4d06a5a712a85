"""The objects one running service shares: settings, store, storage, queue, metrics."""

from __future__ import annotations

import logging
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

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.resolved_database_url)
        return cls(
            settings=settings, store=store, storage=Storage(settings.data_dir), queue=create_queue(settings, store)
        )

    def __post_init__(self) -> None:
        self.metrics = ServiceMetrics(self.store, self.queue)

    def start(self) -> None:
        self.storage.ensure()
        # A partial write older than the longest job belongs to a process that died.
        removed = self.storage.sweep_temp(older_than_s=2 * self.settings.job_timeout_s)
        if removed:
            logger.info("removed %d partial writes left by an earlier run", removed)
        self.store.create_all()
        if not self.settings.api_keys:
            logger.warning(
                "no API keys configured (MONOQUANT_API_KEYS): the service is open to anyone who can reach it; "
                "use this for local development only"
            )
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.store.dispose()
