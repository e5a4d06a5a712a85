"""A finished job's artifacts: list, and download with Range / 206 and a strong ETag (sha256)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse

from app.deps import Ctx, Owner
from app.errors import ConflictError, NotFoundError, problem_responses
from app.jobs.store import ArtifactRow
from app.jobs.views import artifact_model
from app.routes.jobs import _job_or_404
from app.schemas import Artifact
from mono_quant.errors import InputError

router = APIRouter(tags=["artifacts"])
_RANGE = re.compile(r"^bytes=(\d*-\d*)(,\s*\d*-\d*)*$")


def _artifacts_of_finished_job(ctx: Ctx, job_id: str, owner: str) -> list[ArtifactRow]:
    job = _job_or_404(ctx, job_id, owner)
    if job.status != "succeeded":
        raise ConflictError(
            f"job {job_id} is {job.status}: artifacts exist only once it has succeeded",
            suggestion="Wait until GET /v1/jobs/{id} shows status 'succeeded'."
            if job.status in ("queued", "running")
            else "The job did not succeed; see its error, fix the input and submit again.",
        )
    return ctx.store.artifacts(job_id)


@router.get(
    "/v1/jobs/{job_id}/artifacts",
    response_model=list[Artifact],
    summary="List a succeeded job's artifacts",
    responses=problem_responses(401, 404, 409),
)
def list_artifacts(job_id: str, ctx: Ctx, owner: Owner) -> list[Artifact]:
    return [artifact_model(row) for row in _artifacts_of_finished_job(ctx, job_id, owner)]


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name}",
    summary="Download an artifact (Range requests and If-None-Match supported)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The whole file."},
        206: {"description": "The requested byte range."},
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        416: {"description": "Range not satisfiable."},
        **problem_responses(400, 401, 404, 409, 422),
    },
)
def download_artifact(
    job_id: str,
    name: str,
    ctx: Ctx,
    owner: Owner,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=200)] = None,
) -> Response:
    artifact = next((a for a in _artifacts_of_finished_job(ctx, job_id, owner) if a.name == name), None)
    if artifact is None:
        raise NotFoundError(
            f"job {job_id} has no artifact {name!r}", suggestion="List them with GET /v1/jobs/{id}/artifacts."
        )
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable", "Accept-Ranges": "bytes"}
    tags = {tag.strip() for tag in (if_none_match or "").split(",")}
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    if range_header is not None and not _RANGE.match(range_header.strip()):
        raise InputError(
            f"malformed Range header {range_header!r}", suggestion="Use a byte range such as 'bytes=0-1023'."
        )
    path = ctx.storage.artifact_path(job_id, name)
    if not path.is_file():
        raise NotFoundError(
            f"the file of artifact {name!r} is missing from storage",
            suggestion="The job's files were removed; submit the job again.",
        )
    return FileResponse(path, media_type=artifact.media_type, filename=name, headers=headers)
