"""Turning a received form into stored uploads and a queued job (the work behind the POSTs).

Runs in a worker thread of the API process (never on the event loop): it validates the
parameters, checks file formats by their headers, applies Idempotency-Key, then moves the
files into place and inserts the rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pydantic
from fastapi.exceptions import RequestValidationError

from app.context import ServiceContext
from app.errors import NotFoundError, PayloadMismatchError
from app.inputs import inspect_upload
from app.jobs.store import BlobRow, IdempotencyRow, IntegrityError, JobRow, canonical_hash
from app.jobs.webhooks import check_destination
from app.schemas import QuantizeParams
from app.uploads import MultipartForm, ReceivedFile
from mono_quant.errors import InputError

__all__ = ["QUANTIZE_FILE_FIELDS", "UPLOAD_FILE_FIELDS", "Submitted", "submit_job", "submit_upload"]

QUANTIZE_FILE_FIELDS = frozenset({"model", "calibration"})
UPLOAD_FILE_FIELDS = frozenset({"file"})
_LIST_FIELDS = {"include", "exclude", "layer_types"}
_RUNNABLE_FORMATS = {"hf_zip", "pickle", "torch_zip", "torchscript", "pt2"}


@dataclass(frozen=True)
class Submitted:
    """The resource a POST created, or found again through its Idempotency-Key."""

    resource_id: str
    replayed: bool


def _schema_error(field: str, message: str, error_type: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("form", field), "msg": message, "type": error_type}])


def _parse_params(fields: dict[str, object]) -> QuantizeParams:
    try:
        return QuantizeParams.model_validate(fields)
    except pydantic.ValidationError as exc:
        errors = [{**error, "loc": ("form", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _existing_blob(ctx: ServiceContext, owner: str, blob_id: str, kind: str) -> BlobRow:
    blob = ctx.store.get_blob(blob_id, owner, kind) if _valid_uuid(blob_id) else None
    if blob is None:
        noun = "model" if kind == "model" else "dataset"
        raise NotFoundError(
            f"no {noun} with id {blob_id!r}",
            suggestion=f"Upload it with POST /v1/{noun}s and use the returned id, or send the file itself.",
        )
    return blob


def _one_source(file: ReceivedFile | None, blob_id: str | None, field: str, required: bool) -> None:
    if file is not None and blob_id:
        raise _schema_error(field, f"send either a {field} file or {field}_id, not both")
    if required and file is None and not blob_id:
        raise _schema_error(field, f"a {field} file or {field}_id is required", "missing")


def _store_blob(ctx: ServiceContext, owner: str, kind: str, received: ReceivedFile, details: dict) -> BlobRow:
    blob_id = str(uuid.uuid4())
    received.writer.commit(ctx.storage.blob_path(blob_id))
    ctx.metrics.upload_bytes.inc(received.size)
    return BlobRow(
        id=blob_id,
        owner=owner,
        kind=kind,
        filename=received.filename,
        format=details["format"],
        size=received.size,
        sha256=received.sha256,
        details=details,
    )


def _replay(ctx: ServiceContext, owner: str, scope: str, key: str | None, request_hash: str) -> Submitted | None:
    if not key:
        return None
    found = ctx.store.find_idempotency(owner, scope, key)
    if found is None:
        return None
    if found.request_hash != request_hash:
        raise PayloadMismatchError(
            f"Idempotency-Key {key!r} was already used with a different request",
            suggestion="Use a new Idempotency-Key for a different request, or resend the original one unchanged.",
        )
    return Submitted(found.resource_id, replayed=True)


def submit_job(ctx: ServiceContext, owner: str, form: MultipartForm, idempotency_key: str | None) -> Submitted:
    """Validate a quantize form and queue the job. Raises the errors the API maps to 4xx."""
    fields = form.scalar_fields(_LIST_FIELDS)
    model_id = str(fields.pop("model_id", "") or "") or None
    dataset_id = str(fields.pop("dataset_id", "") or "") or None
    params = _parse_params(fields)
    model_file, calibration_file = form.files.get("model"), form.files.get("calibration")
    _one_source(model_file, model_id, "model", required=True)
    _one_source(calibration_file, dataset_id, "calibration", required=False)
    has_calibration = calibration_file is not None or dataset_id is not None
    options = params.options(has_calibration)  # the library's rules: ConfigurationError is a 422 here
    if options.is_static and not has_calibration:
        raise InputError(
            "static int8 quantization (dynamic=false) needs calibration data",
            suggestion="Send a calibration file (safetensors of input tensors, e.g. input_ids and attention_mask) "
            "or a dataset_id, or use dynamic=true, which needs no data.",
        )
    if params.callback_url is not None:
        check_destination(str(params.callback_url), ctx.settings.webhook_allow_private)
    model_blob = _existing_blob(ctx, owner, model_id, "model") if model_id else None
    dataset_blob = _existing_blob(ctx, owner, dataset_id, "dataset") if dataset_id else None

    request_hash = canonical_hash(
        {
            "params": params.model_dump(mode="json", by_alias=True),
            "model": model_file.sha256 if model_file else model_id,
            "calibration": calibration_file.sha256 if calibration_file else dataset_id,
        }
    )
    replayed = _replay(ctx, owner, "quantize", idempotency_key, request_hash)
    if replayed is not None:
        return replayed

    model_details = (
        inspect_upload(model_file.path, "model", ctx.settings, model_file.filename)
        if model_file
        else model_blob.details
    )
    calibration_details = (
        inspect_upload(calibration_file.path, "dataset", ctx.settings, calibration_file.filename)
        if calibration_file
        else {}
    )
    model_format = model_details["format"] if model_file else model_blob.format
    if options.is_static and model_format not in _RUNNABLE_FORMATS:
        raise InputError(
            "static quantization needs a model it can run, but a state_dict / weights file has no forward",
            suggestion="Upload a zip of the Hugging Face model folder (config.json + model.safetensors), "
            "or use dynamic=true on the weights.",
        )

    new_blobs: list[BlobRow] = []
    if model_file is not None:
        model_blob = _store_blob(ctx, owner, "model", model_file, model_details)
        new_blobs.append(model_blob)
    if calibration_file is not None:
        dataset_blob = _store_blob(ctx, owner, "dataset", calibration_file, calibration_details)
        new_blobs.append(dataset_blob)
    for blob in new_blobs:
        ctx.store.add_blob(blob)

    if model_blob is None:  # unreachable: _one_source requires a model file or model_id
        raise _schema_error("model", "a model file or model_id is required", "missing")
    job = JobRow(
        id=str(uuid.uuid4()),
        owner=owner,
        status="queued",
        params=params.model_dump(mode="json", by_alias=True),
        model_blob_id=model_blob.id,
        dataset_blob_id=dataset_blob.id if dataset_blob else None,
        callback_url=str(params.callback_url) if params.callback_url else None,
    )
    idempotency = (
        IdempotencyRow(
            owner=owner, scope="quantize", key=idempotency_key, request_hash=request_hash, resource_id=job.id
        )
        if idempotency_key
        else None
    )
    try:
        ctx.store.add_job(job, idempotency)
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: answer with its job.
        for blob in new_blobs:
            ctx.store.delete_blob(blob.id)
            ctx.storage.remove_blob(blob.id)
        replayed = _replay(ctx, owner, "quantize", idempotency_key, request_hash)
        if replayed is None:
            raise
        return replayed
    ctx.metrics.jobs_submitted.inc()
    ctx.queue.enqueue(job.id)
    return Submitted(job.id, replayed=False)


def submit_upload(
    ctx: ServiceContext, owner: str, kind: str, form: MultipartForm, idempotency_key: str | None
) -> Submitted:
    """Store a reusable model or dataset upload (form field ``file``)."""
    received = form.files.get("file")
    if received is None:
        raise _schema_error("file", "a file is required", "missing")
    unexpected = sorted(form.fields)
    if unexpected:
        raise _schema_error(unexpected[0], f"unexpected form field {unexpected[0]!r}", "extra_forbidden")
    scope = f"upload-{kind}"
    request_hash = canonical_hash({"sha256": received.sha256, "kind": kind})
    replayed = _replay(ctx, owner, scope, idempotency_key, request_hash)
    if replayed is not None:
        return replayed
    details = inspect_upload(received.path, kind, ctx.settings, received.filename)
    blob = _store_blob(ctx, owner, kind, received, details)
    idempotency = (
        IdempotencyRow(owner=owner, scope=scope, key=idempotency_key, request_hash=request_hash, resource_id=blob.id)
        if idempotency_key
        else None
    )
    try:
        ctx.store.add_blob(blob, idempotency)
    except IntegrityError:
        ctx.storage.remove_blob(blob.id)
        replayed = _replay(ctx, owner, scope, idempotency_key, request_hash)
        if replayed is None:
            raise
        return replayed
    return Submitted(blob.id, replayed=False)
