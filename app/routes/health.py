"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: job store, queue and storage usable",
    responses={503: {"model": Health, "description": "A dependency is not ready."}},
)
def readyz(ctx: Ctx) -> JSONResponse:
    checks = {"database": ctx.store.ping(), "queue": ctx.queue.ready(), "storage": ctx.storage.writable()}
    ready = all(checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(ctx: Ctx) -> Response:
    data = await run_in_threadpool(generate_latest, ctx.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
