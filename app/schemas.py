"""Request and response models of the HTTP API.

:class:`QuantizeParams` is the one model the quantize form fields are validated by; the
others describe responses. Field names follow ``mono_quant.quantize()``'s keyword arguments,
so a caller who knows the library knows the API.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "VALID_BITS",
    "JobStatus",
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

VALID_BITS = (4, 8, 16)
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class QuantizeParams(BaseModel):
    """Parameters of a quantization job, sent as multipart form fields next to the files.

    List fields (``include``, ``exclude``, ``layer_types``) take repeated form fields or one
    comma-separated value.
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"examples": [{"bits": 8, "dynamic": True}, {"bits": 4, "group_size": 128}]},
    )

    bits: int = Field(
        8,
        json_schema_extra={"enum": list(VALID_BITS)},
        description="4 (int4 group-wise weights), 8 (int8) or 16 (fp16; bf16 with dtype='bf16').",
    )
    scheme: Literal["symmetric", "asymmetric"] | None = Field(
        None, description="Weight quantization scheme. Default: symmetric for int8, asymmetric for int4."
    )
    dynamic: bool = Field(
        True,
        description="True: no calibration data needed (dynamic int8 activations, or weight-only). "
        "False: static int8, needs calibration data and a runnable model (a zipped Hugging Face folder).",
    )
    weight_only: bool = Field(False, description="Quantize weights only; activations stay float.")
    dtype: Literal["fp16", "bf16"] | None = Field(None, description="Float type for bits=16.")
    group_size: int | None = Field(None, ge=1, le=65536, description="int4 group size along the input axis.")
    per_channel: bool | None = Field(None, description="Per output channel weight scales (default) or per tensor.")
    observer_type: Literal["minmax", "moving_average", "histogram"] | None = Field(
        None, description="Activation observer for static quantization."
    )
    num_calibration_samples: int | None = Field(None, ge=1, le=1_000_000, description="Calibration samples used.")
    layer_types: list[str] | None = Field(
        None, description="Layer kinds to quantize: linear, conv1d, conv2d, embedding, lstm, gru."
    )
    include: list[str] | None = Field(None, description="Only layers matching these globs (or 're:' regexes).")
    exclude: list[str] | None = Field(None, description="Skip layers matching these globs (or 're:' regexes).")
    min_params: int | None = Field(None, ge=0, description="Skip layers with fewer parameters.")
    validate_output: bool = Field(
        True, alias="validate", description="Validate the quantized model and put the metrics in report.json."
    )
    callback_url: AnyHttpUrl | None = Field(
        None, description="Receives a signed webhook (Standard Webhooks) when the job ends."
    )

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, bits: int) -> int:
        if bits not in VALID_BITS:
            raise PydanticCustomError(
                "bits_choice",
                "bits={bits} is not supported; valid values are 4, 8 and 16",
                {"bits": bits, "valid": list(VALID_BITS)},
            )
        return bits

    @field_validator("layer_types", "include", "exclude", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()] or None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeParams:
        if self.dtype is not None and self.bits != 16:
            raise PydanticCustomError(
                "dtype_needs_16_bits",
                "dtype={dtype} needs bits=16, got bits={bits}",
                {"dtype": self.dtype, "bits": self.bits},
            )
        if not self.dynamic and self.bits != 8:
            raise PydanticCustomError(
                "static_needs_int8",
                "static quantization (dynamic=false) is int8 only, got bits={bits}",
                {"bits": self.bits},
            )
        return self

    def library_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``mono_quant.quantize()`` (unset options left to its defaults)."""
        kwargs: dict[str, Any] = {"bits": self.bits, "dynamic": self.dynamic}
        optional = {
            "scheme": self.scheme,
            "dtype": self.dtype,
            "group_size": self.group_size,
            "per_channel": self.per_channel,
            "observer_type": self.observer_type,
            "num_calibration_samples": self.num_calibration_samples,
            "layer_types": self.layer_types,
            "include": self.include,
            "exclude": self.exclude,
            "min_params": self.min_params,
        }
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        if self.weight_only:
            kwargs["weight_only"] = True
        return kwargs


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
