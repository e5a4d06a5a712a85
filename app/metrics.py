"""Prometheus metrics, in a registry per app (several apps can live in one process: tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.jobs.queue import QueueBackend
    from app.jobs.store import JobStore

__all__ = ["ServiceMetrics"]


class _StateCollector(Collector):
    """Reads job counts and worker numbers at scrape time (workers are other processes, so
    in-process counters could not see their work)."""

    def __init__(self, store: JobStore, queue: QueueBackend) -> None:
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("monoquant_jobs", "Jobs in the store by status", labels=["status"])
        counts = self.store.count_by_status()
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        for name, value in self.queue.stats().items():
            yield GaugeMetricFamily(f"monoquant_queue_{name}", f"Queue backend: {name.replace('_', ' ')}", value=value)


class ServiceMetrics:
    def __init__(self, store: JobStore, queue: QueueBackend) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "monoquant_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "monoquant_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.upload_bytes = Counter("monoquant_upload_bytes", "Bytes of accepted uploads", registry=self.registry)
        self.jobs_submitted = Counter("monoquant_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.registry.register(_StateCollector(store, queue))
