"""Reusable uploads: ``/v1/models`` and ``/v1/datasets`` (same shape, one router each)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx, IdempotencyKey, Owner
from app.errors import ConflictError, NotFoundError, problem_responses
from app.jobs.store import BlobRow
from app.jobs.submission import UPLOAD_FILE_FIELDS, submit_upload
from app.jobs.views import upload_model
from app.routes._openapi import multipart_body
from app.schemas import Upload, UploadList
from app.uploads import read_multipart

__all__ = ["make_upload_router"]


def make_upload_router(kind: str, collection: str, file_description: str) -> APIRouter:
    """The router of one upload collection (``kind`` "model" at ``/v1/models``...)."""
    router = APIRouter(prefix=f"/v1/{collection}", tags=[collection])

    def blob_or_404(ctx: Ctx, blob_id: str, owner: str) -> BlobRow:
        try:
            uuid.UUID(blob_id)
        except ValueError:
            blob = None
        else:
            blob = ctx.store.get_blob(blob_id, owner, kind)
        if blob is None:
            raise NotFoundError(f"no {kind} with id {blob_id!r}", suggestion=f"List them with GET /v1/{collection}.")
        return blob

    @router.post(
        "",
        status_code=201,
        response_model=Upload,
        summary=f"Upload a {kind}",
        operation_id=f"upload_{kind}",
        openapi_extra=multipart_body(files={"file": file_description}),
        responses=problem_responses(400, 401, 413, 415, 422, 507),
    )
    async def upload(request: Request, ctx: Ctx, owner: Owner, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        form = await read_multipart(request, ctx.storage, ctx.settings, UPLOAD_FILE_FIELDS)
        try:
            submitted = await run_in_threadpool(submit_upload, ctx, owner, kind, form, idempotency_key)
        finally:
            form.discard()
        blob = await run_in_threadpool(blob_or_404, ctx, submitted.resource_id, owner)
        headers = {"Location": f"/v1/{collection}/{blob.id}"}
        if submitted.replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(upload_model(blob).model_dump(mode="json"), status_code=201, headers=headers)

    @router.get(
        "",
        response_model=UploadList,
        summary=f"List your {collection}",
        operation_id=f"list_{collection}",
        responses=problem_responses(401, 422),
    )
    def list_uploads(
        ctx: Ctx,
        owner: Owner,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> UploadList:
        rows = ctx.store.list_blobs(owner, kind, limit + 1, after)
        page = rows[:limit]
        return UploadList(items=[upload_model(r) for r in page], next_after=page[-1].id if len(rows) > limit else None)

    @router.get(
        "/{upload_id}",
        response_model=Upload,
        summary=f"Get a {kind}",
        operation_id=f"get_{kind}",
        responses=problem_responses(401, 404),
    )
    def get_upload(upload_id: str, ctx: Ctx, owner: Owner) -> Upload:
        return upload_model(blob_or_404(ctx, upload_id, owner))

    @router.delete(
        "/{upload_id}",
        status_code=204,
        summary=f"Delete a {kind}",
        operation_id=f"delete_{kind}",
        responses=problem_responses(401, 404, 409),
    )
    def delete_upload(upload_id: str, ctx: Ctx, owner: Owner) -> Response:
        blob = blob_or_404(ctx, upload_id, owner)
        if ctx.store.blob_in_use(blob.id):
            raise ConflictError(
                f"{kind} {upload_id} is used by a queued or running job",
                suggestion="Wait for the job to finish, or cancel it, then delete.",
            )
        ctx.store.delete_blob(blob.id)
        ctx.storage.remove_blob(blob.id)
        return Response(status_code=204)

    return router


models_router = make_upload_router(
    "model", "models", "A .safetensors or weights-only .pt state_dict, or a zip of a Hugging Face model folder."
)
datasets_router = make_upload_router(
    "dataset",
    "datasets",
    "Calibration or eval data: text (.txt, .jsonl) or safetensors (or weights-only .pt) of tensors, one row "
    "per sample.",
)
