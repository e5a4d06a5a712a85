"""A finished job's artifacts: list, and download with Range / 206 and a strong ETag (sha256).

Range and If-None-Match are checked here, before the file is opened, so that every refusal
is problem+json (Starlette's FileResponse would answer a bad range in plain text).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse

from app.deps import Ctx, Owner, job_or_404
from app.errors import ConflictError, NotFoundError, RangeNotSatisfiableError, problem_responses
from app.jobs.store import ArtifactRow
from app.jobs.views import artifact_model
from app.schemas import Artifact
from mono_quant.errors import InputError

router = APIRouter(tags=["artifacts"])
_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")
_RANGE_HINT = "Use a byte range inside the file, such as 'bytes=0-1023' or 'bytes=-512' (the last 512 bytes)."


def _artifacts_of_finished_job(ctx: Ctx, job_id: str, owner: str) -> list[ArtifactRow]:
    job = job_or_404(ctx, job_id, owner)
    if job.status != "succeeded":
        raise ConflictError(
            f"job {job_id} is {job.status}: artifacts exist only once it has succeeded",
            suggestion="Wait until GET /v1/jobs/{id} shows status 'succeeded'."
            if job.status in ("queued", "running")
            else "The job did not succeed; see its error, fix the input and submit again.",
        )
    return ctx.store.artifacts(job_id)


def check_range(range_header: str, size: int) -> None:
    """Refuse a Range header the download cannot serve: InputError (400) when it is not a
    ``bytes=`` list of ``first-last`` / ``first-`` / ``-suffix`` specs, RangeNotSatisfiableError
    (416) when a spec ends before it starts or starts past the end of the file."""
    unit, _, specs = range_header.strip().partition("=")
    parts = [part.strip() for part in specs.split(",")]
    matches = [_RANGE_SPEC.match(part) for part in parts]
    if unit.strip().lower() != "bytes" or not all(m and (m.group(1) or m.group(2)) for m in matches):
        raise InputError(f"malformed Range header {range_header!r}", suggestion=_RANGE_HINT)
    for part, match in zip(parts, matches, strict=True):
        first, last = match.group(1), match.group(2)
        if first and last and int(last) < int(first):
            raise RangeNotSatisfiableError(
                f"range {part!r} ends before it starts",
                suggestion=f"{_RANGE_HINT} The file has {size} bytes.",
                size=size,
            )
        start = int(first) if first else max(size - int(last), 0)
        if start >= size or (not first and int(last) == 0):
            raise RangeNotSatisfiableError(
                f"range {part!r} is outside the file ({size} bytes)",
                suggestion=f"{_RANGE_HINT} The file has {size} bytes.",
                size=size,
            )


def etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2): ``W/"x"`` matches ``"x"``;
    the header may list several tags, or be ``*``."""
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in if_none_match.split(","))


@router.get(
    "/v1/jobs/{job_id}/artifacts",
    response_model=list[Artifact],
    summary="List a succeeded job's artifacts",
    responses=problem_responses(401, 404, 409),
)
def list_artifacts(job_id: str, ctx: Ctx, owner: Owner) -> list[Artifact]:
    return [artifact_model(row) for row in _artifacts_of_finished_job(ctx, job_id, owner)]


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
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    path = ctx.storage.artifact_path(job_id, name)
    if not path.is_file():
        raise NotFoundError(
            f"the file of artifact {name!r} is missing from storage",
            suggestion="The job's files were removed; submit the job again.",
        )
    if range_header is not None:
        check_range(range_header, path.stat().st_size)
    return FileResponse(path, media_type=artifact.media_type, filename=name, headers=headers)


router.add_api_route(
    "/v1/jobs/{job_id}/artifacts/{name}",
    download_artifact,
    methods=["GET"],
    summary="Download an artifact (Range requests and If-None-Match supported)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The whole file."},
        206: {"description": "The requested byte range."},
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        **problem_responses(400, 401, 404, 409, 416, 422),
    },
)
# HEAD: the same headers (size, ETag) without the body; kept out of the schema, which would
# otherwise list the operation twice under one operationId.
router.add_api_route("/v1/jobs/{job_id}/artifacts/{name}", download_artifact, methods=["HEAD"], include_in_schema=False)
