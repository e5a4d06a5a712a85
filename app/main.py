"""The FastAPI application: ``create_app()`` wires settings, routers, errors and the worker pool.

Run it (embedded defaults: SQLite in ./data, a local worker pool; no other setup)::

    uvicorn app.main:create_app --factory --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import mono_quant
from app.config import Settings
from app.context import ServiceContext
from app.errors import install_error_handlers
from app.middleware import RequestContextMiddleware
from app.routes import artifacts, health, jobs, pages, uploads

__all__ = ["create_app"]

_DESCRIPTION = """
Quantize PyTorch models over HTTP with **mono_quant**: upload a model (safetensors / weights-only
`.pt` state_dict, or a zipped Hugging Face folder), get a job, poll it (or stream its events),
download `model.safetensors` and `report.json`.

* Errors are `application/problem+json` (RFC 9457) with a `suggestion`; schema errors list `errors[]`.
* Auth: `Authorization: Bearer <key>` when the operator configured keys; a key sees only its own resources.
* `Idempotency-Key` on POSTs; `x-request-id` on every response.
* Pages: the job page at `/`, these docs at `/docs`: every asset is served by this service (no internet needed).
"""

_TAGS = [
    {"name": "jobs", "description": "Submit, follow, cancel and delete quantization jobs."},
    {"name": "artifacts", "description": "Download what a succeeded job produced."},
    {"name": "models", "description": "Reusable model uploads (name them with model_id)."},
    {"name": "datasets", "description": "Reusable calibration data uploads (name them with dataset_id)."},
    {"name": "health", "description": "Probes and metrics."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. ``settings`` default to the ``MONOQUANT_*`` environment.

    Example:
        >>> app = create_app(Settings(data_dir="/tmp/mq"))  # doctest: +SKIP
    """
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("app").setLevel(settings.log_level)
    context = ServiceContext.build(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(context.start)
        try:
            yield
        finally:
            await run_in_threadpool(context.stop)

    app = FastAPI(
        title="mono_quant service",
        version=mono_quant.__version__,
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
        # /docs is served from local assets by app.routes.pages (FastAPI's own loads a CDN)
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    install_error_handlers(app)
    for router in (jobs.router, artifacts.router, uploads.models_router, uploads.datasets_router, health.router):
        app.include_router(router)
    pages.install_pages(app)
    app.add_middleware(RequestContextMiddleware, metrics=context.metrics)
    return app
