"""Turning a received form into stored uploads and a queued job (the work behind the POSTs).

Runs in a worker thread of the API process (never on the event loop): it validates the
parameters, checks file formats by their headers, applies Idempotency-Key, then moves the
files into place and inserts the rows. Everything a job could only fail on later is refused
here: options the library refuses, calibration data the mode does not use, text without a
tokenizer to read it, export formats that cannot represent the mode.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic
from fastapi.exceptions import RequestValidationError

from app.context import ServiceContext
from app.errors import NotFoundError, PayloadMismatchError
from app.inputs import TEXT_FORMATS, inspect_upload
from app.jobs.store import BlobRow, IdempotencyRow, IntegrityError, JobRow, canonical_hash
from app.jobs.webhooks import check_destination
from app.schemas import LIST_OPTIONS, QuantizeParams
from app.uploads import MultipartForm, ReceivedFile
from mono_quant.core.options import QuantizeOptions
from mono_quant.errors import ConfigurationError, InputError, UnsupportedFormatError
from mono_quant.export import get_format

__all__ = ["QUANTIZE_FILE_FIELDS", "UPLOAD_FILE_FIELDS", "Submitted", "submit_job", "submit_upload"]

QUANTIZE_FILE_FIELDS = frozenset({"model", "calibration", "eval"})
UPLOAD_FILE_FIELDS = frozenset({"file"})
_LIST_FIELDS = {*LIST_OPTIONS, "export_formats"}
_RUNNABLE_FORMATS = {"hf_zip", "pickle", "torch_zip", "torchscript", "pt2"}
_TEXT = frozenset(TEXT_FORMATS.values())


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


def _check_text_uploads(model_format: str, model_details: dict, formats: dict[str, str | None]) -> None:
    """Text needs the model's tokenizer; eval data must be text."""
    eval_format = formats.get("eval")
    if eval_format is not None and eval_format not in _TEXT:
        raise UnsupportedFormatError(
            f"eval data must be text, got a {eval_format} upload",
            suggestion='Send the eval text as .txt (documents separated by blank lines) or .jsonl ({"text": ...} '
            "per line).",
        )
    text_fields = [field for field, found in formats.items() if found in _TEXT]
    if text_fields and not (model_format == "hf_zip" and model_details.get("tokenizer")):
        raise InputError(
            f"{' and '.join(text_fields)} text needs the model's tokenizer, but the model upload has none",
            suggestion="Zip the Hugging Face folder with its tokenizer files (tokenizer.save_pretrained(folder): "
            "tokenizer.json, tokenizer_config.json, vocab files), or send calibration as safetensors of tensors.",
        )


def _accepts_facts(check: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(check).parameters.values())


def _layer_facts(options: QuantizeOptions, has_calibration: bool, runnable: bool) -> dict[str, Any] | None:
    """What this run's Linear layers will carry that the options alone do not tell a format's
    check: SmoothQuant input scales (on layers it cannot fold, e.g. o_proj) and HQQ's float zero
    points. ``runnable``: a model with a forward (a Hugging Face folder), whose token embedding
    gives statistics without calibration data. None when neither applies."""
    statistics = "calibration data" if has_calibration else "random tokens" if runnable else None
    # folded only, no layer divides its input at run time
    smoothed = options.effective_smoothing(statistics is not None) is not None and not options.smoothing_folded_only
    float_zero_point = options.layer_method(options.bits, statistics) == "hqq" and not options.symmetric
    if not (smoothed or float_zero_point):
        return None
    return {
        "kind": "QuantizedLinear",
        "bits": options.bits,
        "symmetric": options.symmetric,
        "activation": options.activation,
        "group_size": options.group_size,
        "smoothed_input": smoothed,
        "float_zero_point": float_zero_point,
    }


def _check_exports(
    names: list[str], options: QuantizeOptions, has_calibration: bool, model_format: str, model_details: dict
) -> None:
    """Each requested format's own check, with the options (and the architecture when known),
    then with the layers the run will produce, so a job is never queued to fail at export."""
    layer = _layer_facts(options, has_calibration, runnable=model_format in _RUNNABLE_FORMATS)
    for name in names:
        exporter = get_format(name)  # an unknown name: ConfigurationError listing the formats
        if model_format != "hf_zip":
            raise ConfigurationError(
                f"export_formats={name!r} needs the model's architecture and config, but the upload is a "
                f"{model_format} file of weights",
                suggestion="Upload a zip of the Hugging Face model folder (config.json + safetensors weights + "
                "tokenizer files) to export, or drop export_formats.",
            )
        if _accepts_facts(exporter.check) and model_details.get("model_type"):
            exporter.check(options, architecture=model_details["model_type"])
        else:
            exporter.check(options)
        if layer is not None:
            mode = "cast" if options.bits == 16 else {"none": "weight_only"}.get(options.activation, options.activation)
            exporter.check(
                {
                    "mode": mode,
                    "bits": options.bits,
                    "symmetric": options.symmetric,
                    "group_size": options.group_size,
                    "layer_configs": {"(this run's linear layers)": layer},
                }
            )


def _details(ctx: ServiceContext, received: ReceivedFile | None, blob: BlobRow | None) -> dict:
    if received is not None:
        return inspect_upload(received.path, "dataset", ctx.settings, received.filename)
    return {**(blob.details or {}), "format": blob.format} if blob is not None else {}


def submit_job(ctx: ServiceContext, owner: str, form: MultipartForm, idempotency_key: str | None) -> Submitted:
    """Validate a quantize form and queue the job. Raises the errors the API maps to 4xx."""
    fields = form.scalar_fields(_LIST_FIELDS)
    model_id = str(fields.pop("model_id", "") or "") or None
    dataset_id = str(fields.pop("dataset_id", "") or "") or None
    eval_id = str(fields.pop("eval_id", "") or "") or None
    params = _parse_params(fields)
    model_file, calibration_file = form.files.get("model"), form.files.get("calibration")
    eval_file = form.files.get("eval")
    _one_source(model_file, model_id, "model", required=True)
    _one_source(calibration_file, dataset_id, "calibration", required=False)
    _one_source(eval_file, eval_id, "eval", required=False)
    has_calibration = calibration_file is not None or dataset_id is not None
    options = params.options(has_calibration)  # the library's rules: ConfigurationError is a 422 here
    # the library's rules on data, before any file is read or a job queued
    options.check_data(has_calibration, has_eval=eval_file is not None or eval_id is not None)
    for name in params.export_formats:
        get_format(name).check(options)  # before any file is read
    if params.callback_url is not None:
        check_destination(str(params.callback_url), ctx.settings.webhook_allow_private)
    model_blob = _existing_blob(ctx, owner, model_id, "model") if model_id else None
    dataset_blob = _existing_blob(ctx, owner, dataset_id, "dataset") if dataset_id else None
    eval_blob = _existing_blob(ctx, owner, eval_id, "dataset") if eval_id else None

    request_hash = canonical_hash(
        {
            "params": params.model_dump(mode="json", by_alias=True),
            "model": model_file.sha256 if model_file else model_id,
            "calibration": calibration_file.sha256 if calibration_file else dataset_id,
            "eval": eval_file.sha256 if eval_file else eval_id,
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
    calibration_details = _details(ctx, calibration_file, dataset_blob)
    eval_details = _details(ctx, eval_file, eval_blob)
    model_format = model_details["format"] if model_file else model_blob.format
    if (options.is_static or has_calibration) and model_format not in _RUNNABLE_FORMATS:
        raise InputError(
            "calibration needs a model it can run, but a state_dict / weights file has no forward",
            suggestion="Upload a zip of the Hugging Face model folder (config.json + model.safetensors), "
            "or use a data-free mode (dynamic=true, bits=4 with method rtn or hqq) on the weights.",
        )
    if options.rotation and model_format not in _RUNNABLE_FORMATS:
        raise InputError(
            "rotation needs the model's structure (which norms feed which layers) and runs it to check the "
            "result, but a state_dict / weights file has neither",
            suggestion="Upload a zip of the Hugging Face model folder (config.json + model.safetensors), or drop "
            "rotation.",
        )
    _check_text_uploads(
        model_format,
        model_details or {},
        {"calibration": calibration_details.get("format"), "eval": eval_details.get("format")},
    )
    _check_exports(params.export_formats, options, has_calibration, model_format, model_details or {})

    new_blobs: list[BlobRow] = []
    if model_file is not None:
        model_blob = _store_blob(ctx, owner, "model", model_file, model_details)
        new_blobs.append(model_blob)
    if calibration_file is not None:
        dataset_blob = _store_blob(ctx, owner, "dataset", calibration_file, calibration_details)
        new_blobs.append(dataset_blob)
    if eval_file is not None:
        eval_blob = _store_blob(ctx, owner, "dataset", eval_file, eval_details)
        new_blobs.append(eval_blob)
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
        eval_blob_id=eval_blob.id if eval_blob else None,
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
