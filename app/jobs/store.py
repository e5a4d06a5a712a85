"""The job store: blobs, jobs, their events and artifacts, and idempotency keys (SQLAlchemy 2).

The same code runs on SQLite (embedded default) and PostgreSQL (by URL). Every state change
of a job is a conditional UPDATE (``WHERE status = ...`` and, for a running job, ``AND
attempt = ...``), so two processes racing on one job cannot both win: a worker whose job was
cancelled, timed out or handed to another attempt simply finds that its writes match no row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "TERMINAL",
    "ACTIVE",
    "Base",
    "BlobRow",
    "JobRow",
    "EventRow",
    "ArtifactRow",
    "IdempotencyRow",
    "JobStore",
    "utcnow",
    "new_id",
    "make_engine",
    "canonical_hash",
    "IntegrityError",
]

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}


class BlobRow(Base):
    """An uploaded file: a model (``kind="model"``) or calibration data (``kind="dataset"``)."""

    __tablename__ = "blobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """One quantization job. ``seq`` orders jobs (cursor pagination); ``id`` is what users see."""

    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_blob_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("blobs.id"), nullable=True)
    dataset_blob_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("blobs.id"), nullable=True)
    eval_blob_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("blobs.id"), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class EventRow(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64))


class IdempotencyRow(Base):
    """``Idempotency-Key`` bookkeeping: which resource a key created, and for which payload."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner", "scope", "key"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker process writes; busy_timeout makes writers queue
    # up instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode and a busy timeout (several processes write)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


_SCHEMA_LOCK_KEY = 0x6D6F6E6F71  # "monoq": the advisory lock taken while creating tables


class JobStore:
    """All reads and writes of jobs and uploads. Thread-safe; one instance per process.

    Example:
        >>> store = JobStore("sqlite://")  # in memory
        >>> store.create_all()
    """

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        """Create missing tables. Safe when several processes start at once: on PostgreSQL a
        transaction-scoped advisory lock serialises them (concurrent CREATE TABLE otherwise
        fails on the catalog's unique index)."""
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # readiness probe: any failure means "not ready"
            return False

    # -- blobs ------------------------------------------------------------------------------------
    def add_blob(self, blob: BlobRow, idempotency: IdempotencyRow | None = None) -> BlobRow:
        """Insert an upload record (and its Idempotency-Key, atomically: IntegrityError if taken)."""
        with self.session() as session:
            session.add(blob)
            if idempotency is not None:
                session.add(idempotency)
        return blob

    def get_blob(self, blob_id: str, owner: str, kind: str | None = None) -> BlobRow | None:
        with self.session() as session:
            blob = session.get(BlobRow, blob_id)
            if blob is None or blob.owner != owner or (kind is not None and blob.kind != kind):
                return None
            return blob

    def list_blobs(self, owner: str, kind: str, limit: int, after: str | None) -> list[BlobRow]:
        with self.session() as session:
            query = select(BlobRow).where(BlobRow.owner == owner, BlobRow.kind == kind)
            if after is not None:
                anchor = session.get(BlobRow, after)
                # another key's id (or another kind's) is a cursor like any unknown one
                if anchor is not None and anchor.owner == owner and anchor.kind == kind:
                    query = query.where(
                        (BlobRow.created_at < anchor.created_at)
                        | ((BlobRow.created_at == anchor.created_at) & (BlobRow.id < anchor.id))
                    )
            query = query.order_by(BlobRow.created_at.desc(), BlobRow.id.desc()).limit(limit)
            return list(session.scalars(query))

    def blob_in_use(self, blob_id: str) -> bool:
        with self.session() as session:
            query = select(JobRow.id).where(
                JobRow.status.in_(ACTIVE),
                (JobRow.model_blob_id == blob_id)
                | (JobRow.dataset_blob_id == blob_id)
                | (JobRow.eval_blob_id == blob_id),
            )
            return session.scalars(query.limit(1)).first() is not None

    def delete_blob(self, blob_id: str) -> None:
        with self.session() as session:
            # Finished jobs keep their record; they just no longer point at the upload.
            session.execute(update(JobRow).where(JobRow.model_blob_id == blob_id).values(model_blob_id=None))
            session.execute(update(JobRow).where(JobRow.dataset_blob_id == blob_id).values(dataset_blob_id=None))
            session.execute(update(JobRow).where(JobRow.eval_blob_id == blob_id).values(eval_blob_id=None))
            blob = session.get(BlobRow, blob_id)
            if blob is not None:
                session.delete(blob)

    # -- jobs -------------------------------------------------------------------------------------
    def add_job(self, job: JobRow, idempotency: IdempotencyRow | None = None) -> JobRow:
        """Insert a queued job (and its Idempotency-Key, atomically: IntegrityError if taken)."""
        with self.session() as session:
            session.add(job)
            if idempotency is not None:
                session.add(idempotency)
            session.flush()
            session.add(EventRow(job_id=job.id, type="queued", data={}))
        return job

    def get_job(self, job_id: str, owner: str | None = None) -> JobRow | None:
        with self.session() as session:
            job = session.scalars(select(JobRow).where(JobRow.id == job_id)).first()
            if job is None or (owner is not None and job.owner != owner):
                return None
            return job

    def list_jobs(self, owner: str, limit: int, after: str | None, status: Sequence[str] | None) -> list[JobRow]:
        with self.session() as session:
            query = select(JobRow).where(JobRow.owner == owner)
            if status:
                query = query.where(JobRow.status.in_(list(status)))
            if after is not None:
                # another key's job id is a cursor like any unknown one: it reveals nothing
                anchor_seq = session.scalars(
                    select(JobRow.seq).where(JobRow.id == after, JobRow.owner == owner)
                ).first()
                if anchor_seq is not None:
                    query = query.where(JobRow.seq < anchor_seq)
            return list(session.scalars(query.order_by(JobRow.seq.desc()).limit(limit)))

    def queued_job_ids(self, limit: int) -> list[str]:
        with self.session() as session:
            query = select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.seq).limit(limit)
            return list(session.scalars(query))

    def running_jobs(self) -> list[JobRow]:
        with self.session() as session:
            return list(session.scalars(select(JobRow).where(JobRow.status == "running")))

    def count_by_status(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
            return {status: count for status, count in rows}

    def claim(self, job_id: str, worker: str) -> int | None:
        """queued -> running. Returns this run's attempt number, or None when the job is not
        queued any more (cancelled, deleted or already taken): the caller must not run it."""
        with self.session() as session:
            job = session.scalars(select(JobRow).where(JobRow.id == job_id)).first()
            if job is None or job.status != "queued":
                return None
            attempt = job.attempt + 1
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued", JobRow.attempt == job.attempt)
                .values(status="running", attempt=attempt, worker=worker, started_at=utcnow(), progress_fraction=0.0)
            )
            if result.rowcount != 1:
                return None
            # "worker" (host:pid) is for operators: the API leaves it out of tenants' events
            session.add(EventRow(job_id=job_id, type="running", data={"attempt": attempt, "worker": worker}))
            return attempt

    def set_progress(self, job_id: str, attempt: int, stage: str, fraction: float, new_stage: bool) -> bool:
        """Record progress of the current run; False when the run is no longer the current one."""
        with self.session() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running", JobRow.attempt == attempt)
                .values(progress_stage=stage, progress_fraction=fraction)
            )
            if result.rowcount == 1 and new_stage:
                session.add(EventRow(job_id=job_id, type="stage", data={"stage": stage}))
            return result.rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        with self.session() as session:
            flag = session.scalars(select(JobRow.cancel_requested).where(JobRow.id == job_id)).first()
            return bool(flag) or flag is None  # a deleted job counts as cancelled

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one at once, a running one by flagging it for its worker.
        Returns the status after the call, or None when the job is gone."""
        with self.session() as session:
            queued = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
            )
            if queued.rowcount == 1:
                session.add(EventRow(job_id=job_id, type="cancelled", data={"reason": "cancelled by the caller"}))
                return "cancelled"
            session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(cancel_requested=True)
            )
            return session.scalars(select(JobRow.status).where(JobRow.id == job_id)).first()

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        attempt: int | None = None,
        error: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        artifacts: Sequence[ArtifactRow] = (),
    ) -> bool:
        """running -> succeeded | failed | cancelled, with its artifacts, in one transaction.
        With ``attempt`` the update only applies to that run. False when nothing changed."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        with self.session() as session:
            conditions = [JobRow.id == job_id, JobRow.status == "running"]
            if attempt is not None:
                conditions.append(JobRow.attempt == attempt)
            if error is not None:
                error = _named_for_the_user(session, job_id, error)
            values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
            if status == "succeeded":
                values["progress_fraction"] = 1.0
                values["progress_stage"] = "done"
            if metrics is not None:
                values["metrics"] = metrics
            result = session.execute(update(JobRow).where(*conditions).values(**values))
            if result.rowcount != 1:
                return False
            for artifact in artifacts:
                session.merge(artifact)
            session.add(EventRow(job_id=job_id, type=status, data={"error": error} if error else {}))
            return True

    def requeue(self, job_id: str, reason: str) -> bool:
        """running -> queued after its worker was lost (the next run gets attempt + 1)."""
        with self.session() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running")
                .values(status="queued", worker=None, progress_stage=None, progress_fraction=0.0)
            )
            if result.rowcount == 1:
                session.add(EventRow(job_id=job_id, type="requeued", data={"reason": reason}))
            return result.rowcount == 1

    def delete_job(self, job_id: str) -> None:
        with self.session() as session:
            session.execute(EventRow.__table__.delete().where(EventRow.job_id == job_id))
            session.execute(ArtifactRow.__table__.delete().where(ArtifactRow.job_id == job_id))
            session.execute(JobRow.__table__.delete().where(JobRow.id == job_id))

    # -- events and artifacts ---------------------------------------------------------------------
    def events(self, job_id: str, after_seq: int = 0) -> list[EventRow]:
        with self.session() as session:
            query = select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > after_seq)
            return list(session.scalars(query.order_by(EventRow.seq)))

    def artifacts(self, job_id: str) -> list[ArtifactRow]:
        with self.session() as session:
            query = select(ArtifactRow).where(ArtifactRow.job_id == job_id).order_by(ArtifactRow.name)
            return list(session.scalars(query))

    # -- idempotency ------------------------------------------------------------------------------
    def find_idempotency(self, owner: str, scope: str, key: str) -> IdempotencyRow | None:
        with self.session() as session:
            query = select(IdempotencyRow).where(
                IdempotencyRow.owner == owner, IdempotencyRow.scope == scope, IdempotencyRow.key == key
            )
            return session.scalars(query).first()


def _named_for_the_user(session: Session, job_id: str, error: dict[str, Any]) -> dict[str, Any]:
    """A job error names the job's uploads by the file names their owner gave them, never by
    the server's storage names (``blobs/<uuid hex>``), whichever code path raised it."""
    job = session.scalars(select(JobRow).where(JobRow.id == job_id)).first()
    if job is None:
        return error
    names = {}
    for blob_id in (job.model_blob_id, job.dataset_blob_id, job.eval_blob_id):
        blob = session.get(BlobRow, blob_id) if blob_id else None
        if blob is not None:
            names[uuid.UUID(blob.id).hex] = blob.filename
    if not names:
        return error
    renamed = dict(error)
    for key in ("message", "suggestion"):
        if isinstance(renamed.get(key), str):
            for storage_name, filename in names.items():
                renamed[key] = renamed[key].replace(storage_name, filename)
    return renamed


# Columns added after a release: (table, column, DDL type). create_all() creates missing tables
# only, so a store made by an older version gets these with ALTER TABLE (additive, nullable).
_ADDED_COLUMNS = (("jobs", "eval_blob_id", "VARCHAR(36)"),)


def _add_missing_columns(connection: Any) -> None:
    from sqlalchemy import inspect

    inspector = inspect(connection)
    for table, column, ddl_type in _ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}"))


def canonical_hash(payload: Any) -> str:
    """sha256 of a JSON-serialisable payload, independent of key order."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
