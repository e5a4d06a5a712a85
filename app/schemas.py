"""Request and response models of the HTTP API.

:class:`QuantizeParams` is the one model the quantize form fields are validated by; the
others describe responses. Field names follow ``mono_quant.quantize()``'s keyword arguments,
so a caller who knows the library knows the API.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, create_model, field_validator

from mono_quant.core.options import OptionSpec, QuantizeOptions, option_specs, option_type, split_list
from mono_quant.export import EXPORT_FORMATS, options_for_formats

__all__ = [
    "JobStatus",
    "LIST_OPTIONS",
    "QuantizeParams",
    "Progress",
    "JobError",
    "Artifact",
    "Job",
    "JobList",
    "JobEvent",
    "Upload",
    "UploadList",
    "Problem",
    "FieldError",
    "Health",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# Form fields that take repeated values or one comma-separated value.
LIST_OPTIONS = tuple(name for name in option_specs(http=True) if option_type(name) is list)


def _option_annotation(name: str, default: Any, spec: OptionSpec) -> Any:
    """The form field type of a library option (its choices become an enum in the schema)."""
    value_type = option_type(name)
    if value_type is list:
        return list[str] | None
    if spec.choices is not None and isinstance(spec.choices[0], str):
        return Literal[spec.choices] | None  # type: ignore[valid-type]
    return value_type | None


class _ServiceParams(BaseModel):
    """The fields only the service has; the library's options are added from QuantizeOptions."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"examples": [{"bits": 8, "dynamic": True}, {"bits": 4, "group_size": 128}]},
    )

    validate_output: bool = Field(
        True, alias="validate", description="Validate the quantized model and put the metrics in report.json."
    )
    callback_url: AnyHttpUrl | None = Field(
        None, description="Receives a signed webhook (Standard Webhooks) when the job ends."
    )
    seq_len: int = Field(
        512,
        ge=8,
        le=32768,
        description="Text calibration / eval: tokens per packed sequence (capped at the model's "
        "max_position_embeddings).",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Text calibration: seed of the random choice of sequences to calibrate on."
    )
    export_formats: list[str] = Field(
        default_factory=list,
        description="Exports written next to model.safetensors, one artifact each: "
        "compressed-tensors (compressed-tensors.zip), gguf (model.gguf), onnx (model.onnx). "
        "Repeated fields or one comma-separated value; checked against the mode at submission.",
        json_schema_extra={"items": {"type": "string", "enum": list(EXPORT_FORMATS)}},
    )

    @field_validator(*LIST_OPTIONS, mode="before", check_fields=False)
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return split_list(value) if isinstance(value, (str, list)) else value

    @field_validator("export_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: Any) -> Any:
        if isinstance(value, (str, list)):
            return list(dict.fromkeys(split_list(value) or []))  # order kept, duplicates dropped
        return value

    def library_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``mono_quant.quantize()``: the options the caller set (unset
        ones are left to the library's defaults; ``dynamic`` to :meth:`options`' rule)."""
        return {name: getattr(self, name) for name in _HTTP_OPTIONS if getattr(self, name) is not None}

    def options(self, has_calibration: bool) -> QuantizeOptions:
        """The library's options for this job, validated by the library itself (its
        ConfigurationError answers 422 at submission): int8 without ``dynamic`` is static when
        calibration data comes with the job and dynamic otherwise; defaults the requested
        ``export_formats`` cannot store give way to ones they can (``options_for_formats``)."""
        options = QuantizeOptions.for_request(has_calibration, **self.library_kwargs())
        return options_for_formats(options, self.export_formats, has_calibration)


_HTTP_NOTES = {"dynamic": ". Left out: int8 is static when the job has calibration data, dynamic otherwise."}
# Every library option the HTTP form takes, its description and enum from the one declaration.
_HTTP_OPTIONS = option_specs(http=True)
QuantizeParams = create_model(
    "QuantizeParams",
    __base__=_ServiceParams,
    __doc__="""Parameters of a quantization job, sent as multipart form fields next to the files.

    The library options (``bits``, ``group_size``...) are :class:`mono_quant.core.options.QuantizeOptions`'
    fields, with their help and valid values; a value the library refuses answers 422 with its
    suggestion. List fields (``include``, ``exclude``, ``layer_types``) take repeated form fields
    or one comma-separated value.
    """,
    **{
        name: (
            _option_annotation(name, default, spec),
            Field(
                None,
                description=spec.help + _HTTP_NOTES.get(name, ""),
                json_schema_extra={"enum": list(spec.choices)}
                if spec.choices and option_type(name) is not list
                else None,
            ),
        )
        for name, (default, spec) in _HTTP_OPTIONS.items()
    },
)


class Progress(BaseModel):
    stage: str | None = Field(None, description="queued, load, calibrate, quantize, validate, save, done")
    fraction: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the current stage done.")


class JobError(BaseModel):
    type: str = Field(description="The exception type, e.g. InputError, QuantizationError, WorkerLost.")
    message: str
    suggestion: str | None = None


class Artifact(BaseModel):
    name: str = Field(examples=["model.safetensors"])
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex sha256; also the download's strong ETag.")
    media_type: str
    url: str = Field(description="Download path.")


class Job(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    params: dict[str, Any] = Field(description="The validated QuantizeParams of the job.")
    model_id: str | None
    dataset_id: str | None
    eval_id: str | None = Field(None, description="The eval text upload the report's accuracy figures come from.")
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    attempt: int = Field(0, description="Runs started so far (a run lost with its worker is retried once).")
    cancel_requested: bool = False
    error: JobError | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[Artifact] = Field(default_factory=list)


class JobList(BaseModel):
    items: list[Job]
    next_after: str | None = Field(None, description="Pass as ?after= to get the next page; null on the last page.")


class JobEvent(BaseModel):
    seq: int
    type: str = Field(description="queued, running, stage, requeued, succeeded, failed, cancelled")
    at: dt.datetime
    data: dict[str, Any] = Field(default_factory=dict)


class Upload(BaseModel):
    """A stored upload: a model (``POST /v1/models``) or calibration data (``POST /v1/datasets``)."""

    id: str
    kind: Literal["model", "dataset"]
    filename: str = Field(description="The name the file was uploaded with (display only).")
    format: str = Field(description="safetensors, pt, hf_zip, or a trusted-only format")
    size: int
    sha256: str
    created_at: dt.datetime
    details: dict[str, Any] = Field(default_factory=dict)


class UploadList(BaseModel):
    items: list[Upload]
    next_after: str | None = None


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the error is: ['form', 'bits'], ['query', 'limit']...")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, plus the library's ``suggestion`` and, for schema errors, ``errors``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "https://mono-quant.dev/problems/configuration-error",
                    "title": "Configuration Error",
                    "status": 422,
                    "detail": "bits=5 is not supported; valid values are 4, 8 and 16",
                    "suggestion": "Fix the fields listed in errors[]: bits: bits=5 is not supported; ...",
                    "errors": [{"loc": ["form", "bits"], "msg": "bits=5 is not supported", "type": "bits_choice"}],
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    suggestion: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = Field(default_factory=dict)
