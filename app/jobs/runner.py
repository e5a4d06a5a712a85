"""``run_job(job_id, settings)``: the one function every worker calls to run a job.

The embedded queue calls it in a spawned child process; a Celery task will call it the same
way. It is safe to call more than once for a job: it claims the job first (queued ->
running, with a new attempt number) and does nothing when the job is not queued, so a
redelivered message never runs a job twice. Every later write is tied to that attempt, so a
run that was cancelled, timed out or replaced cannot overwrite the job's outcome.

Stages, reported as ``progress {stage, fraction}``: load, calibrate (static only), quantize,
validate, evaluate (with eval text), save, export (with export_formats). Cancellation is
checked between stages and inside the library's progress callback.

Text uploads are tokenized here with the model's own tokenizer (:mod:`app.jobs.evaluation`);
the report says which windows were calibrated on and which were measured, never the same.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.config import Settings
from app.inputs import TEXT_FORMATS, TRUSTED_ONLY_FORMATS, extract_model_zip, named_for_the_user
from app.jobs.evaluation import HELD_OUT_FRACTION, TextWindows, choose_windows, pack_text, split_held_out
from app.jobs.store import ArtifactRow, BlobRow, JobRow, JobStore
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
# eval windows per batch of the accuracy target (4 x 512 tokens)
_EVAL_BATCH = 4


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


@dataclass
class _Model:
    """What the worker loaded: the model for quantize() (a module or a weights file path)."""

    model: Any
    trusted: bool = False
    tokenizer: Any = None
    warnings: list[str] | None = None


def _load_model(
    job: JobRow, store: JobStore, storage: Storage, work_dir: Path, settings: Settings, needs_tokenizer: bool
) -> _Model:
    """The job's model; its tokenizer when the job reads text (a failure is then the job's
    error) or exports (a failure is then a warning: the exporters do without)."""
    blob = store.get_blob(job.model_blob_id, job.owner) if job.model_blob_id else None
    if blob is None:
        raise InputError("the job's model upload was deleted", suggestion="Upload the model again and resubmit.")
    blob_path = storage.blob_path(blob.id)
    if blob.format != "hf_zip":
        return _Model(str(blob_path), trusted=blob.format in TRUSTED_ONLY_FORMATS)
    from mono_quant.io.hf import load_hf_folder, load_hf_tokenizer

    folder = extract_model_zip(blob_path, work_dir / "model", settings)
    loaded = _Model(load_hf_folder(folder), warnings=[])
    params = QuantizeParams.model_validate(job.params)
    if needs_tokenizer:
        loaded.tokenizer = load_hf_tokenizer(folder)
    elif params.export_formats:
        try:
            loaded.tokenizer = load_hf_tokenizer(folder)
        except InputError as exc:
            loaded.warnings.append(f"exported without a tokenizer: {exc.message}")
    return loaded


def _blob(job: JobRow, store: JobStore, blob_id: str | None, what: str) -> BlobRow | None:
    if blob_id is None:
        return None
    blob = store.get_blob(blob_id, job.owner)
    if blob is None:
        raise InputError(f"the job's {what} upload was deleted", suggestion="Upload it again and resubmit.")
    return blob


def _text_windows(blob: BlobRow, storage: Storage, loaded: _Model, seq_len: int) -> TextWindows:
    if loaded.tokenizer is None:  # refused at submission; a blob named by id may predate the check
        raise InputError(
            f"{blob.filename} is text, but the model upload has no tokenizer to read it",
            suggestion="Zip the model folder with its tokenizer files (tokenizer.save_pretrained(folder)).",
        )
    path = storage.blob_path(blob.id)
    with named_for_the_user(path, blob.filename):
        return pack_text(path, blob.format, blob.filename, loaded.tokenizer, seq_len, loaded.model)


@dataclass
class _Data:
    """The job's data: calibration for quantize(), eval windows for the report, and what
    the report says about both."""

    calibration: Any = None
    eval_windows: TextWindows | None = None
    calibration_report: dict[str, Any] | None = None
    eval_report: dict[str, Any] | None = None


def _load_data(
    job: JobRow, params: Any, store: JobStore, storage: Storage, loaded: _Model, settings: Settings
) -> _Data:
    """Calibration and eval data: tensors as uploaded, text tokenized and packed; without an
    eval upload the last part of the calibration text is held out for the report."""
    data = _Data()
    text_formats = set(TEXT_FORMATS.values())
    calibration_blob = _blob(job, store, job.dataset_blob_id, "calibration")
    eval_blob = _blob(job, store, job.eval_blob_id, "eval")
    options = params.options(has_calibration=calibration_blob is not None)
    if eval_blob is not None:
        data.eval_windows = _text_windows(eval_blob, storage, loaded, params.seq_len)
        data.eval_report = {"source": f"eval upload {eval_blob.filename}", **data.eval_windows.describe()}
    if calibration_blob is not None and calibration_blob.format in text_formats:
        windows = _text_windows(calibration_blob, storage, loaded, params.seq_len)
        held_out = None
        if data.eval_windows is None:
            windows, held_out = split_held_out(windows)
        chosen = choose_windows(windows, options.effective_calibration_samples, params.seed)
        data.calibration = chosen.batch()
        data.calibration_report = {
            "source": calibration_blob.filename,
            "format": calibration_blob.format,
            **windows.describe(),
            "samples": len(chosen),
            "seed": params.seed,
            "held_out_windows": len(held_out) if held_out is not None else 0,
            "notes": windows.notes,
        }
        if held_out is not None:
            data.eval_windows = held_out
            data.eval_report = {
                "source": f"held out: the last {HELD_OUT_FRACTION:.0%} of the calibration text's sequences "
                f"({calibration_blob.filename}), never calibrated on",
                **held_out.describe(),
            }
        elif data.eval_windows is None:
            data.calibration_report["notes"] = [
                *windows.notes,
                "one sequence only: nothing could be held out, so no accuracy figure comes from the text",
            ]
    elif calibration_blob is not None:
        from mono_quant.io.hf import load_calibration_file

        path = storage.blob_path(calibration_blob.id)
        with named_for_the_user(path, calibration_blob.filename):
            data.calibration = load_calibration_file(path)
    if data.eval_windows is not None:
        cap = max(1, settings.eval_max_tokens // max(data.eval_windows.seq_len, 1))
        if len(data.eval_windows) > cap:
            data.eval_windows = data.eval_windows.rows(slice(0, cap))
            data.eval_report = {**data.eval_report, **data.eval_windows.describe(), "capped_by": "eval_max_tokens"}
    return data


def _eval_batches(windows: TextWindows) -> list[dict[str, Any]]:
    return [windows.rows(slice(start, start + _EVAL_BATCH)).batch() for start in range(0, len(windows), _EVAL_BATCH)]


def _validation_sample(data: _Data, model: Any) -> Any:
    """Inputs the output metrics are measured on: eval text, else tensor calibration rows (as
    uploaded), else a transformers model's own ``dummy_inputs``."""
    if data.eval_windows is not None:
        return data.eval_windows.rows(slice(0, _VALIDATION_ROWS)).batch()
    calibration = data.calibration
    if isinstance(calibration, dict):
        return {name: tensor[:_VALIDATION_ROWS] for name, tensor in calibration.items()}
    if calibration is not None:
        return calibration[:_VALIDATION_ROWS]
    dummy = getattr(model, "dummy_inputs", None) if not isinstance(model, str) else None
    return dict(dummy) if isinstance(dummy, dict) and dummy else None


def _zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    return archive


def _two_rows(tensor: Any) -> Any:
    rows = tensor[:2]
    return rows.repeat(2, *([1] * (rows.dim() - 1))) if rows.shape[0] == 1 else rows


def _export(
    job: JobRow, result: Any, names: list[str], loaded: _Model, data: _Data, storage: Storage, work_dir: Path, reporter
) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """One artifact per requested format; returns ``(report entries, (name, stored) pairs)``."""
    from mono_quant.export import ARTIFACT_NAMES

    entries, stored_files = [], []
    export_dir = work_dir / "exports"
    export_dir.mkdir(parents=True, exist_ok=True)
    sample = _validation_sample(data, result.original)
    if isinstance(sample, dict):
        # Tracing wants a small example of 2 rows: a dimension of size 1 is specialized by torch.export.
        device = next(result.model.parameters()).device
        sample = {name: _two_rows(tensor).to(device) for name, tensor in sample.items()}
    for index, name in enumerate(names):
        reporter("export", index / len(names))
        started = time.perf_counter()
        artifact = ARTIFACT_NAMES[name]
        target = export_dir / (name if artifact.endswith(".zip") else artifact)
        written = Path(
            result.save(
                target,
                format=name,
                tokenizer=loaded.tokenizer,
                sample_inputs=sample if name == "onnx" else None,
            )
        )
        if written.is_dir():
            written = _zip_folder(written, export_dir / artifact)
        stored = storage.import_file(written, storage.artifact_path(job.id, artifact))
        stored_files.append((artifact, stored))
        entries.append(
            {
                "format": name,
                "artifact": artifact,
                "size": stored.size,
                "sha256": stored.sha256,
                "export_s": time.perf_counter() - started,
            }
        )
        reporter.check_cancel()
    reporter("export", 1.0)
    return entries, stored_files


def _execute(
    job: JobRow, store: JobStore, storage: Storage, reporter: _Reporter, settings: Settings, device: str = "cpu"
) -> tuple[dict, list[ArtifactRow]]:
    """Load, quantize, validate, evaluate, save, export. Returns ``(metrics, artifacts)``."""
    import mono_quant

    timings: dict[str, float] = {}
    params = QuantizeParams.model_validate(job.params)
    work_dir = storage.job_work_dir(job.id)
    work_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    reporter("load", 0.0)
    text_formats = set(TEXT_FORMATS.values())
    uploads = [store.get_blob(blob_id, job.owner) for blob_id in (job.dataset_blob_id, job.eval_blob_id) if blob_id]
    uses_text = any(blob is not None and blob.format in text_formats for blob in uploads)
    loaded = _load_model(job, store, storage, work_dir, settings, needs_tokenizer=uses_text)
    data = _load_data(job, params, store, storage, loaded, settings)
    reporter("load", 1.0)
    timings["load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    options = params.options(has_calibration=data.calibration is not None)
    kwargs = {**options.given(), "progress_callback": reporter}
    if options.is_static:
        kwargs["calibration_batch_size"] = _CALIBRATION_BATCH
    if loaded.trusted:
        kwargs["trusted"] = True
    model = loaded.model
    if isinstance(model, str):
        kwargs["device"] = device  # weights files are moved tensor by tensor
    else:
        model = model.to(device)  # a model this worker built itself
    calibration = data.calibration if options.uses_calibration() else None
    if options.max_accuracy_loss is not None and data.eval_windows is not None:
        # the accuracy target is measured on the job's eval text (its upload, or the held-out
        # part of the calibration text): the same windows the report's accuracy comes from
        kwargs["eval_data"] = _eval_batches(data.eval_windows)
    result = mono_quant.quantize(model, calibration_data=calibration, **kwargs)
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
        sample = _validation_sample(data, model)
        if isinstance(sample, dict) and not isinstance(model, str):
            sample = {name: tensor.to(device) for name, tensor in sample.items()}
        validation = result.validate(sample_inputs=sample, on_failure="ignore").to_dict()
        reporter("validate", 1.0)
        timings["validate_s"] = time.perf_counter() - started

    accuracy: dict[str, Any] = {}
    if data.eval_windows is not None and not isinstance(model, str):
        from app.jobs.evaluation import measure_accuracy

        started = time.perf_counter()
        reporter("evaluate", 0.0)
        accuracy = measure_accuracy(result.original, result.model, data.eval_windows)
        reporter("evaluate", 1.0)
        timings["evaluate_s"] = time.perf_counter() - started
        reporter.check_cancel()

    reporter("save", 0.0)
    started = time.perf_counter()
    artifact_dir = storage.job_artifact_dir(job.id)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    saved = result.save(work_dir / "model.safetensors")
    model_file = storage.import_file(saved, storage.artifact_path(job.id, "model.safetensors"))
    timings["save_s"] = time.perf_counter() - started
    reporter("save", 1.0)

    exports: list[dict[str, Any]] = []
    stored_exports: list[tuple[str, Any]] = []
    if params.export_formats:
        started = time.perf_counter()
        exports, stored_exports = _export(job, result, params.export_formats, loaded, data, storage, work_dir, reporter)
        timings["export_s"] = time.perf_counter() - started

    info = result.info.to_dict()
    report = {
        "job_id": job.id,
        "params": params.model_dump(mode="json", by_alias=True),
        "info": info,
        "validation": validation,
        "calibration": data.calibration_report,
        "accuracy": {**(data.eval_report or {}), **accuracy} if data.eval_report else None,
        "library_metrics": info.get("metrics") or {},
        "exports": exports,
        "warnings": [*result.warnings, *(loaded.warnings or [])],
        "timings": timings,
        "mono_quant_version": mono_quant.__version__,
        "model_sha256": model_file.sha256,
    }
    report_file = storage.write_bytes(
        storage.artifact_path(job.id, "report.json"),
        json.dumps(_json_safe(report), indent=2, default=str).encode(),
    )
    smoothing = (info.get("metrics") or {}).get("smoothing")
    target = (info.get("metrics") or {}).get("accuracy_target")
    metrics = {
        "bits": info.get("bits"),
        "mode": info.get("mode"),
        "method": _methods(info) or options.effective_method,
        "selected_layers": len(info.get("selected_layers") or []),
        "skipped_layers": len(info.get("skipped_layers") or []),
        "original_size_bytes": info.get("original_size_bytes"),
        "quantized_size_bytes": info.get("quantized_size_bytes"),
        "compression_ratio": info.get("compression_ratio"),
        **({"smoothing_alpha": smoothing["alpha"]} if isinstance(smoothing, dict) else {}),
        **(
            {
                "accuracy_target_met": target["met"],
                "accuracy_target_loss": target["loss"],
                "accuracy_target_trials": len(target["trials"]),
                "layers_moved": target["moved_layers"],
            }
            if isinstance(target, dict)
            else {}
        ),
        **({"validation_passed": validation.get("passed")} if validation else {}),
        **(
            {key: validation.get(key) for key in ("mean_weight_sqnr_db", "output_sqnr_db", "output_cosine")}
            if validation
            else {}
        ),
        **accuracy,
        **({"calibration_samples": data.calibration_report["samples"]} if data.calibration_report else {}),
        **({"eval_windows": data.eval_report["windows"]} if data.eval_report else {}),
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
        for name, stored in (("model.safetensors", model_file), ("report.json", report_file), *stored_exports)
    ]
    return _json_safe(metrics), artifacts


def _json_safe(value: Any) -> Any:
    """Metrics go into a JSON column: no NaN/inf (JSON has none)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
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
    import torch

    torch.set_num_threads(settings.torch_threads)  # workers share the machine's cores
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
        metrics, artifacts = _execute(job, store, storage, reporter, settings, _device(settings))
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


def _methods(info: dict) -> str | None:
    """How the quantized Linears were rounded ("hqq", "rtn", "gptq"; "hqq+rtn" when they differ,
    e.g. HQQ int4 layers beside an 8-bit head), from the layer configs."""
    configs = (info.get("layer_configs") or {}).values()
    methods = sorted({c["method"] for c in configs if c.get("kind") == "QuantizedLinear" and c.get("method")})
    return "+".join(methods) or None
