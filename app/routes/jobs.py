"""Quantization jobs: submit (``POST /v1/quantize``, alias ``POST /quantize``), list, get,
cancel, delete, events (JSON or Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx, IdempotencyKey, Owner, job_or_404
from app.errors import ConflictError, problem_responses
from app.jobs.store import TERMINAL, JobRow
from app.jobs.submission import QUANTIZE_FILE_FIELDS, submit_job
from app.jobs.views import job_model, utc
from app.routes._openapi import multipart_body
from app.schemas import Job, JobEvent, JobList, JobStatus, QuantizeParams
from app.uploads import read_multipart

router = APIRouter(tags=["jobs"])

_SSE_POLL_S = 0.5
_SSE_KEEPALIVE_S = 15.0
_QUANTIZE_BODY = multipart_body(
    files={
        "model": "The model: .safetensors or weights-only .pt state_dict, or a zip of a Hugging Face model "
        "folder (config.json + model.safetensors). Or send model_id.",
        "calibration": "Calibration data (static int8, method=gptq, SmoothQuant): text (.txt: documents "
        'separated by blank lines; .jsonl: {"text": ...} per line) tokenized with the zipped model\'s tokenizer '
        "and packed into seq_len sequences, or safetensors of input tensors (input_ids, attention_mask). "
        "Or send dataset_id.",
        "eval": "Text (.txt / .jsonl) the report measures accuracy on: perplexity for causal LMs, embedding "
        "cosine for encoders. Default: the last 10% of the calibration text's sequences. Or send eval_id.",
    },
    params=QuantizeParams,
    extra={
        "model_id": {"type": "string", "format": "uuid", "description": "A model uploaded with POST /v1/models."},
        "dataset_id": {"type": "string", "format": "uuid", "description": "Data uploaded with POST /v1/datasets."},
        "eval_id": {"type": "string", "format": "uuid", "description": "Eval text uploaded with POST /v1/datasets."},
    },
)


def _job_response(ctx: Ctx, job: JobRow) -> dict:
    return job_model(job, ctx.store.artifacts(job.id)).model_dump(mode="json")


async def submit(request: Request, ctx: Ctx, owner: Owner, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Upload a model (or name one) with parameters; the job is queued and runs in the background.

    Answers 202 with the job and ``Location: /v1/jobs/{id}``; poll it, or stream its events.
    """
    form = await read_multipart(request, ctx.storage, ctx.settings, QUANTIZE_FILE_FIELDS)
    try:
        submitted = await run_in_threadpool(submit_job, ctx, owner, form, idempotency_key)
    finally:
        form.discard()
    job = await run_in_threadpool(job_or_404, ctx, submitted.resource_id, owner)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(await run_in_threadpool(_job_response, ctx, job), status_code=202, headers=headers)


_SUBMIT_DOC = {
    "status_code": 202,
    "response_model": Job,
    "openapi_extra": _QUANTIZE_BODY,
    "responses": {
        202: {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}}},
        **problem_responses(400, 401, 404, 413, 415, 422, 507),
    },
}
router.add_api_route(
    "/v1/quantize",
    submit,
    methods=["POST"],
    summary="Submit a quantization job",
    operation_id="submit_job",
    **_SUBMIT_DOC,
)
router.add_api_route(
    "/quantize",
    submit,
    methods=["POST"],
    summary="Submit a quantization job (alias of POST /v1/quantize)",
    operation_id="submit_job_alias",
    **_SUBMIT_DOC,
)


@router.get(
    "/v1/jobs", response_model=JobList, summary="List your jobs, newest first", responses=problem_responses(401, 422)
)
def list_jobs(
    ctx: Ctx,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="next_after of the previous page")] = None,
    status: Annotated[list[JobStatus] | None, Query(description="Only jobs in these states")] = None,
) -> JobList:
    rows = ctx.store.list_jobs(owner, limit + 1, after, status)
    page = rows[:limit]
    return JobList(
        items=[job_model(row, ctx.store.artifacts(row.id)) for row in page],
        next_after=page[-1].id if len(rows) > limit else None,
    )


@router.get("/v1/jobs/{job_id}", response_model=Job, summary="Get a job", responses=problem_responses(401, 404))
def get_job(job_id: str, ctx: Ctx, owner: Owner) -> dict:
    return _job_response(ctx, job_or_404(ctx, job_id, owner))


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    description="A queued job is cancelled at once (200). A running job's worker is stopped: the answer is 202 "
    "with cancel_requested=true, and the job turns cancelled moments later. A finished job answers 409.",
    responses={202: {"model": Job, "description": "Cancellation under way."}, **problem_responses(401, 404, 409)},
)
def cancel_job(job_id: str, ctx: Ctx, owner: Owner) -> JSONResponse:
    job = job_or_404(ctx, job_id, owner)
    if job.status in TERMINAL:
        raise ConflictError(
            f"job {job_id} is already {job.status}", suggestion="Only queued or running jobs can be cancelled."
        )
    status = ctx.store.request_cancel(job_id)
    if status == "running":
        ctx.queue.cancel(job_id)
    job = job_or_404(ctx, job_id, owner)
    return JSONResponse(_job_response(ctx, job), status_code=202 if status == "running" else 200)


@router.delete(
    "/v1/jobs/{job_id}",
    status_code=204,
    summary="Delete a job and its artifacts (an active job is cancelled first)",
    responses=problem_responses(401, 404),
)
def delete_job(job_id: str, ctx: Ctx, owner: Owner) -> Response:
    job = job_or_404(ctx, job_id, owner)
    if job.status not in TERMINAL and ctx.store.request_cancel(job_id) == "running":
        ctx.queue.cancel(job_id)
    ctx.store.delete_job(job_id)
    ctx.storage.remove_job_files(job_id)
    return Response(status_code=204)


# Stored with events for operators, never shown to tenants (which host and pid ran a job).
_OPERATOR_ONLY_EVENT_DATA = frozenset({"worker"})


def _event_model(row) -> JobEvent:
    data = {key: value for key, value in (row.data or {}).items() if key not in _OPERATOR_ONLY_EVENT_DATA}
    return JobEvent(seq=row.seq, type=row.type, at=utc(row.at), data=data)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_model=list[JobEvent],
    summary="A job's events (JSON, or Server-Sent Events with Accept: text/event-stream)",
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "Events."},
        **problem_responses(401, 404, 422),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    ctx: Ctx,
    owner: Owner,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> Response:
    await run_in_threadpool(job_or_404, ctx, job_id, owner)
    if "text/event-stream" not in request.headers.get("accept", ""):
        rows = await run_in_threadpool(ctx.store.events, job_id)
        return JSONResponse([_event_model(row).model_dump(mode="json") for row in rows])
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _sse(ctx, job_id, after, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(ctx: Ctx, job_id: str, after: int, request: Request) -> AsyncIterator[str]:
    """Stored events as they happen, plus ``progress`` updates, until the job ends."""
    last_progress: tuple | None = None
    idle = 0.0
    while True:
        for row in await run_in_threadpool(ctx.store.events, job_id, after):
            after = row.seq
            yield f"id: {row.seq}\nevent: {row.type}\ndata: {_event_model(row).model_dump_json()}\n\n"
            idle = 0.0
        job = await run_in_threadpool(ctx.store.get_job, job_id)
        if job is None or job.status in TERMINAL:
            return
        progress = (job.progress_stage, round(job.progress_fraction or 0.0, 3))
        if progress != last_progress and job.status == "running":
            last_progress = progress
            data = json.dumps({"stage": progress[0], "fraction": progress[1]})
            yield f"event: progress\ndata: {data}\n\n"
            idle = 0.0
        if await request.is_disconnected():
            return
        await asyncio.sleep(_SSE_POLL_S)
        idle += _SSE_POLL_S
        if idle >= _SSE_KEEPALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"
