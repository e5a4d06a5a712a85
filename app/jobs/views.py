"""Store rows -> API models (shared by the routes, the runner's webhooks and the queue)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from app.jobs.store import ArtifactRow, BlobRow, JobRow
from app.schemas import Artifact, Job, JobError, Progress, Upload

__all__ = ["artifact_model", "job_model", "upload_model", "utc"]


def utc(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment


def artifact_model(row: ArtifactRow) -> Artifact:
    return Artifact(
        name=row.name,
        size=row.size,
        sha256=row.sha256,
        media_type=row.media_type,
        url=f"/v1/jobs/{row.job_id}/artifacts/{row.name}",
    )


def job_model(row: JobRow, artifacts: Sequence[ArtifactRow] = ()) -> Job:
    return Job(
        id=row.id,
        status=row.status,  # type: ignore[arg-type]
        progress=Progress(stage=row.progress_stage or row.status, fraction=row.progress_fraction or 0.0),
        params=row.params,
        model_id=row.model_blob_id,
        dataset_id=row.dataset_blob_id,
        eval_id=row.eval_blob_id,
        created_at=utc(row.created_at),
        started_at=utc(row.started_at),
        finished_at=utc(row.finished_at),
        attempt=row.attempt,
        cancel_requested=row.cancel_requested,
        error=JobError(**row.error) if row.error else None,
        metrics=row.metrics or {},
        artifacts=[artifact_model(a) for a in artifacts],
    )


def upload_model(row: BlobRow) -> Upload:
    return Upload(
        id=row.id,
        kind=row.kind,  # type: ignore[arg-type]
        filename=row.filename,
        format=row.format,
        size=row.size,
        sha256=row.sha256,
        created_at=utc(row.created_at),
        details=row.details or {},
    )
