"""Liveness, readiness (GET and HEAD) and Prometheus metrics (the operator's metrics key when
keys are configured: the counts cover every tenant)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx, MetricsReader
from app.errors import problem_responses
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


# HEAD for probes that only look at the status (out of the schema: one operation per path).
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    description="Open when no API keys are configured; otherwise only `Authorization: Bearer "
    "<MONOQUANT_METRICS_KEY>` may read it (the counts cover every tenant).",
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
        **problem_responses(401),
    },
)
async def metrics(ctx: Ctx, _reader: MetricsReader) -> Response:
    data = await run_in_threadpool(generate_latest, ctx.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
