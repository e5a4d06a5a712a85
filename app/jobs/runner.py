"""``run_job(job_id, settings)``: the one function every worker calls to run a job.

The embedded queue calls it in a spawned child process; a Celery task will call it the same
way. It is safe to call more than once for a job: it claims the job first (queued ->
running, with a new attempt number) and does nothing when the job is not queued, so a
redelivered message never runs a job twice. Every later write is tied to that attempt, so a
run that was cancelled, timed out or replaced cannot overwrite the job's outcome.

Stages, reported as ``progress {stage, fraction}``: load, calibrate (static only), quantize,
validate, save. Cancellation is checked between stages and inside the library's progress
callback.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.config import Settings
from app.inputs import TRUSTED_ONLY_FORMATS, extract_model_zip
from app.jobs.store import ArtifactRow, JobRow, JobStore
from app.jobs.views import job_model
from app.jobs.webhooks import deliver
from app.schemas import QuantizeParams
from app.storage import ARTIFACT_MEDIA_TYPES, Storage
from mono_quant.errors import InputError, MonoQuantError, QuantizationError

__all__ = ["JobCancelled", "run_job", "notify_job_end"]

logger = logging.getLogger("app.runner")
_CANCEL_POLL_S = 0.5
_PROGRESS_WRITE_S = 0.25
_CALIBRATION_BATCH = 16
_VALIDATION_ROWS = 8


class JobCancelled(Exception):
    """Raised inside a run when the job was cancelled (or handed to another attempt)."""


@lru_cache(maxsize=4)
def _store(database_url: str) -> JobStore:
    return JobStore(database_url)


class _Reporter:
    """The library's ``progress_callback``: writes progress to the job row (throttled) and
    stops the run when the job was cancelled."""

    def __init__(self, store: JobStore, job_id: str, attempt: int) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.stage: str | None = None
        self._last_write = 0.0
        self._last_cancel_check = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        new_stage = stage != self.stage
        if new_stage or fraction >= 1.0 or now - self._last_write >= _PROGRESS_WRITE_S:
            self.stage = stage
            self._last_write = now
            if not self.store.set_progress(self.job_id, self.attempt, stage, fraction, new_stage):
                raise JobCancelled(self.job_id)
        if now - self._last_cancel_check >= _CANCEL_POLL_S:
            self.check_cancel()

    def check_cancel(self) -> None:
        self._last_cancel_check = time.monotonic()
        if self.store.cancel_requested(self.job_id):
            raise JobCancelled(self.job_id)


def _device(settings: Settings) -> str:
    """The device this worker quantizes on (``Settings.device``; "auto" picks CUDA if present)."""
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise QuantizationError(
            "this worker is configured for CUDA (MONOQUANT_DEVICE=cuda) but sees no GPU",
            suggestion="Fix the worker's GPU setup (driver, CUDA build of torch, CUDA_VISIBLE_DEVICES).",
        )
    return settings.device


def _load_model(job: JobRow, store: JobStore, storage: Storage, work_dir: Path) -> tuple[Any, bool]:
    """``(model for quantize(), trusted)`` from the job's uploaded model."""
    blob = store.get_blob(job.model_blob_id, job.owner) if job.model_blob_id else None
    if blob is None:
        raise InputError("the job's model upload was deleted", suggestion="Upload the model again and resubmit.")
    blob_path = storage.blob_path(blob.id)
    blob_format = blob.format
    if blob_format == "hf_zip":
        from mono_quant.io.hf import load_hf_folder

        folder = extract_model_zip(blob_path, work_dir / "model")
        return load_hf_folder(folder), False
    return str(blob_path), blob_format in TRUSTED_ONLY_FORMATS


def _load_calibration(job: JobRow, storage: Storage) -> Any:
    """The job's calibration inputs: one tensor, or a dict of keyword inputs (``input_ids``,
    ``attention_mask``...) whose first dimension indexes samples; the library batches both."""
    if job.dataset_blob_id is None:
        return None
    from mono_quant.io.hf import load_calibration_file

    return load_calibration_file(storage.blob_path(job.dataset_blob_id))


def _validation_sample(calibration: Any) -> Any:
    if calibration is None:
        return None
    if isinstance(calibration, dict):
        return {name: tensor[:_VALIDATION_ROWS] for name, tensor in calibration.items()}
    return calibration[:_VALIDATION_ROWS]


def _execute(
    job: JobRow, store: JobStore, storage: Storage, reporter: _Reporter, device: str = "cpu"
) -> tuple[dict, list[ArtifactRow]]:
    """Load, quantize, validate, save. Returns ``(metrics, artifacts)``."""
    import mono_quant

    timings: dict[str, float] = {}
    params = QuantizeParams.model_validate(job.params)
    work_dir = storage.job_work_dir(job.id)
    work_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    reporter("load", 0.0)
    model, trusted = _load_model(job, store, storage, work_dir)
    calibration = _load_calibration(job, storage)
    reporter("load", 1.0)
    timings["load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    options = params.options(has_calibration=calibration is not None)
    kwargs = {**options.given(), "progress_callback": reporter}
    if options.is_static:
        kwargs["calibration_batch_size"] = _CALIBRATION_BATCH
    if trusted:
        kwargs["trusted"] = True
    if isinstance(model, str):
        kwargs["device"] = device  # weights files are moved tensor by tensor
    else:
        model = model.to(device)  # a model this worker built itself
    result = mono_quant.quantize(model, calibration_data=calibration if options.is_static else None, **kwargs)
    timings["quantize_s"] = time.perf_counter() - started
    if not result.success:
        raise QuantizationError(
            "quantization failed: " + "; ".join(result.errors),
            suggestion="Try other parameters (bits, scheme, exclude the failing layers), or report the model.",
        )
    reporter.check_cancel()

    validation: dict[str, Any] | None = None
    if params.validate_output:
        started = time.perf_counter()
        reporter("validate", 0.0)
        validation = result.validate(sample_inputs=_validation_sample(calibration), on_failure="ignore").to_dict()
        reporter("validate", 1.0)
        timings["validate_s"] = time.perf_counter() - started

    reporter("save", 0.0)
    started = time.perf_counter()
    artifact_dir = storage.job_artifact_dir(job.id)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    saved = result.save(work_dir / "model.safetensors")
    model_file = storage.import_file(saved, storage.artifact_path(job.id, "model.safetensors"))
    timings["save_s"] = time.perf_counter() - started
    info = result.info.to_dict()
    report = {
        "job_id": job.id,
        "params": params.model_dump(mode="json", by_alias=True),
        "info": info,
        "validation": validation,
        "warnings": result.warnings,
        "timings": timings,
        "mono_quant_version": mono_quant.__version__,
        "model_sha256": model_file.sha256,
    }
    report_file = storage.write_bytes(
        storage.artifact_path(job.id, "report.json"), json.dumps(report, indent=2, default=str).encode()
    )
    reporter("save", 1.0)
    metrics = {
        "bits": info.get("bits"),
        "mode": info.get("mode"),
        "selected_layers": len(info.get("selected_layers") or []),
        "skipped_layers": len(info.get("skipped_layers") or []),
        "original_size_bytes": info.get("original_size_bytes"),
        "quantized_size_bytes": info.get("quantized_size_bytes"),
        "compression_ratio": info.get("compression_ratio"),
        **({"validation_passed": validation.get("passed")} if validation else {}),
        **(
            {key: validation.get(key) for key in ("mean_weight_sqnr_db", "output_sqnr_db", "output_cosine")}
            if validation
            else {}
        ),
        **timings,
    }
    artifacts = [
        ArtifactRow(
            job_id=job.id,
            name=name,
            size=stored.size,
            sha256=stored.sha256,
            media_type=ARTIFACT_MEDIA_TYPES[name],
        )
        for name, stored in (("model.safetensors", model_file), ("report.json", report_file))
    ]
    return _json_safe(metrics), artifacts


def _json_safe(value: Any) -> Any:
    """Metrics go into a JSON column: no NaN/inf (JSON has none)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def notify_job_end(settings: Settings, store: JobStore, job_id: str) -> None:
    """Send the job-end webhook if the job asked for one (never raises)."""
    job = store.get_job(job_id)
    if job is None or not job.callback_url or job.status not in ("succeeded", "failed", "cancelled"):
        return
    body = job_model(job, store.artifacts(job_id)).model_dump(mode="json")
    deliver(settings, job.callback_url, f"job.{job.status}", body, message_id=f"msg_{job.id}_{job.attempt}")


def run_job(job_id: str, settings: Settings) -> str | None:
    """Run job ``job_id`` to its end. Returns the final status, or None when the job was not
    queued (already taken, cancelled or deleted) and nothing was done.

    Example:
        >>> run_job("5f0c...", Settings())  # doctest: +SKIP
        'succeeded'
    """
    store = _store(settings.resolved_database_url)
    storage = Storage(settings.data_dir)
    attempt = store.claim(job_id, f"{socket.gethostname()}:{os.getpid()}")
    if attempt is None:
        return None
    job = store.get_job(job_id)
    if job is None:
        return None
    reporter = _Reporter(store, job_id, attempt)
    try:
        metrics, artifacts = _execute(job, store, storage, reporter, _device(settings))
        store.finish(job_id, "succeeded", attempt=attempt, metrics=metrics, artifacts=artifacts)
    except JobCancelled:
        store.finish(job_id, "cancelled", attempt=attempt)
    except MonoQuantError as exc:
        store.finish(job_id, "failed", attempt=attempt, error=exc.to_dict())
    except Exception as exc:  # a job must end "failed", whatever broke inside it
        logger.exception("job %s failed unexpectedly", job_id)
        store.finish(
            job_id,
            "failed",
            attempt=attempt,
            error={
                "type": "InternalError",
                "message": f"{type(exc).__name__}: {str(exc)[:500]}",
                "suggestion": "This looks like a bug or an unsupported model; the server log has the traceback.",
            },
        )
    finally:
        storage.remove_work_dir(job_id)
    final = store.get_job(job_id)
    if final is None:  # deleted while it ran
        storage.remove_job_files(job_id)
        return None
    if final.attempt != attempt:  # another run owns the job now
        return final.status
    if final.status != "succeeded":
        storage.remove_artifacts(job_id)
    notify_job_end(settings, store, job_id)
    return final.status
