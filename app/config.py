"""Every knob of the service, read once from the environment (prefix ``MONOQUANT_``).

This is the only place that reads the environment: everything else receives a
:class:`Settings` instance (the app factory, the worker processes, the runner).

Example:
    >>> Settings(data_dir="/tmp/mq", api_keys="k1,k2").api_keys
    ['k1', 'k2']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

_GIB = 1024**3


class Settings(BaseSettings):
    """Service configuration. Each field is set by ``MONOQUANT_<FIELD NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MONOQUANT_", env_file=None, extra="ignore", frozen=True)

    data_dir: Path = Field(Path("data"), description="Uploads, artifacts and the SQLite database live here.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the job store. Default: SQLite file in data_dir. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db",
    )
    max_upload_bytes: int = Field(8 * _GIB, gt=0, description="Largest accepted upload body (413 past it).")
    max_form_field_bytes: int = Field(64 * 1024, gt=0, description="Largest accepted non-file form field.")
    upload_chunk_bytes: int = Field(1024 * 1024, gt=0, description="Chunk size used when streaming files to disk.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes of the embedded queue (one job each).")
    worker_threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Torch threads of each worker process. Default: the machine's cores divided by the embedded "
        "queue's workers (all cores for a celery worker), so busy workers never oversubscribe the CPU: on 2 cores "
        "with other processes busy, a 2-thread elementwise pass measured 8x slower than on 1 thread.",
    )
    job_timeout_s: float = Field(3600.0, gt=0, description="A running job is stopped and failed after this long.")
    max_attempts: int = Field(
        2, ge=1, le=5, description="Runs a job may get when its worker dies under it (1 = never retried)."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted Bearer keys, comma separated. Empty: the server is open (development only).",
    )
    trusted_inputs: bool = Field(
        False,
        description="Accept pickled modules, TorchScript and .pt2 uploads (they can run code when loaded; "
        "they are only ever loaded inside a worker process). Never enable for untrusted callers.",
    )
    queue: Literal["embedded", "celery"] = Field("embedded", description="Queue backend that runs the jobs.")
    broker_url: str | None = Field(None, description="Broker URL of the celery queue backend (Redis).")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret ('whsec_' + base64). "
        "Default: generated once and kept in data_dir/webhook_secret.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow callback_url hosts on loopback, private, link-local or reserved addresses. Off by "
        "default: a caller must not make the server probe its own network (SSRF).",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Timeout of one webhook delivery attempt.")
    webhook_attempts: int = Field(3, ge=1, le=10, description="Delivery attempts per webhook.")
    dispatch_interval_s: float = Field(0.5, gt=0, description="How often the embedded queue looks for work.")
    max_zip_uncompressed_bytes: int = Field(
        16 * _GIB, gt=0, description="Largest total size of a zipped model folder once extracted."
    )
    max_zip_compression_ratio: float = Field(
        100.0,
        gt=1,
        description="Largest uncompressed/compressed size ratio of a zip member (413 past it). Model weights "
        "hardly compress (about 1.1x); a zip bomb compresses about 1000x.",
    )
    max_zip_members: int = Field(
        1000,
        gt=0,
        description="Most entries a zipped model folder may have (413 past it); counted before the zip is opened.",
    )
    max_job_write_bytes: int = Field(
        32 * _GIB,
        gt=0,
        description="Most bytes a job may write to its work directory (an extracted zip counts its real bytes, "
        "whatever the archive declares); the job fails past it.",
    )
    max_safetensors_header_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        le=100 * 1024 * 1024,
        description="Largest safetensors header (JSON) accepted; parsing costs a multiple of it in memory.",
    )
    max_safetensors_tensors: int = Field(
        100_000, gt=0, description="Most tensors a safetensors file (or each zipped shard) may declare."
    )
    max_text_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest calibration or eval text upload (.txt / .jsonl); 413 past it. The worker "
        "tokenizes all of it.",
    )
    eval_max_tokens: int = Field(
        32768,
        gt=0,
        description="Most tokens of eval text a job scores (before and after quantization): the first "
        "eval_max_tokens // seq_len windows.",
    )
    temp_max_age_s: float = Field(
        900.0,
        gt=0,
        description="A partial write in data_dir/tmp untouched for this long belongs to a dead process and is "
        "removed (at start and every temp_sweep_interval_s).",
    )
    temp_sweep_interval_s: float = Field(300.0, gt=0, description="How often partial writes are swept.")
    metrics_key: SecretStr | None = Field(
        None,
        description="Bearer key that may read /metrics (job counts of every tenant). /metrics is open only "
        "when neither this nor API keys are configured.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where workers quantize: 'cuda' (a GPU worker), 'cpu', or 'auto' (CUDA when available). "
        "A GPU worker needs a CUDA build of torch.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def torch_threads(self) -> int:
        """Threads a worker's torch uses (see ``worker_threads``)."""
        if self.worker_threads is not None:
            return self.worker_threads
        cores = os.cpu_count() or 1
        return max(1, cores // self.workers) if self.queue == "embedded" else cores

    @property
    def resolved_database_url(self) -> str:
        """The job store URL: ``database_url`` or a SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'monoquant.db').resolve()}"


def get_settings() -> Settings:
    """Settings read from the environment (``MONOQUANT_*``)."""
    return Settings()
