"""Every error the API answers is ``application/problem+json`` (RFC 9457).

The status follows the library's exception hierarchy (most specific class first)::

    ConfigurationError 422   InputError 400   UnsupportedFormatError 415
    InputTooLargeError 413   ValidationError 422   QuantizationError 422

plus the service's own :class:`NotFoundError` 404, :class:`ConflictError` 409,
:class:`AuthenticationError` 401, :class:`RangeNotSatisfiableError` 416 and
:class:`InsufficientStorageError` 507 (a full disk). FastAPI's request validation errors get
the same shape with ``errors[]``. Only a bug in the service itself answers 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mono_quant.errors import (
    ConfigurationError,
    InputError,
    InputTooLargeError,
    MonoQuantError,
    QuantizationError,
    UnsupportedFormatError,
    ValidationError,
)

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "ServiceError",
    "NotFoundError",
    "ConflictError",
    "AuthenticationError",
    "PayloadMismatchError",
    "RangeNotSatisfiableError",
    "InsufficientStorageError",
    "status_for",
    "problem_response",
    "problem_responses",
    "install_error_handlers",
]

logger = logging.getLogger("app.errors")
PROBLEM_MEDIA_TYPE = "application/problem+json"


class ServiceError(MonoQuantError):
    """An error of the service itself (not of the library); ``status`` is its HTTP status,
    ``headers`` extra response headers."""

    status = 400
    headers: dict[str, str] | None = None


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class AuthenticationError(ServiceError):
    status = 401


class PayloadMismatchError(ServiceError):
    """An Idempotency-Key reused with a different payload."""

    status = 422


class RangeNotSatisfiableError(ServiceError):
    """A Range header no byte of the file satisfies (416, with ``Content-Range: bytes */size``)."""

    status = 416

    def __init__(self, message: str, suggestion: str | None, size: int) -> None:
        super().__init__(message, suggestion)
        self.headers = {"Content-Range": f"bytes */{size}"}


class InsufficientStorageError(ServiceError):
    """The server's disk is full: nothing was kept of the write (507)."""

    status = 507


# Most specific first: the first class in an exception's MRO found here decides the status.
_STATUS_BY_CLASS: dict[type[BaseException], int] = {
    UnsupportedFormatError: 415,
    InputTooLargeError: 413,
    InputError: 400,
    ConfigurationError: 422,
    ValidationError: 422,
    QuantizationError: 422,
    MonoQuantError: 400,
}


def status_for(error: MonoQuantError) -> int:
    """The HTTP status of a library or service error."""
    if isinstance(error, ServiceError):
        return error.status
    for cls in type(error).__mro__:
        if cls in _STATUS_BY_CLASS:
            return _STATUS_BY_CLASS[cls]
    return 400


def _slug(name: str) -> str:
    out = []
    for index, char in enumerate(name):
        if char.isupper() and index:
            out.append("-")
        out.append(char.lower())
    return "".join(out)


def _title(name: str) -> str:
    return _slug(name).replace("-", " ").title()


def problem_response(
    request: Request,
    status: int,
    *,
    type_name: str,
    detail: str,
    suggestion: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A problem+json response; ``type`` is a relative URI naming the error class."""
    body: dict[str, Any] = {
        "type": f"/problems/{_slug(type_name)}",
        "title": _title(type_name),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "suggestion": suggestion,
        "request_id": getattr(request.state, "request_id", None),
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _field_errors(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"loc": [part for part in error.get("loc", ()) if part is not None], "msg": error["msg"], "type": error["type"]}
        for error in raw
    ]


def _schema_suggestion(errors: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors[:5]]
    return "Fix the fields listed in errors[]: " + "; ".join(parts) + "."


async def _mono_quant_error(request: Request, exc: MonoQuantError) -> JSONResponse:
    status = status_for(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mono_quant"'

    return problem_response(
        request,
        status,
        type_name=type(exc).__name__,
        detail=exc.message,
        suggestion=exc.suggestion,
        headers=headers or None,
    )


async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _field_errors(list(exc.errors()))
    detail = errors[0]["msg"] if len(errors) == 1 else f"{len(errors)} fields are invalid"
    return problem_response(
        request,
        422,
        type_name="ConfigurationError",
        detail=detail,
        suggestion=_schema_suggestion(errors),
        errors=errors,
    )


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    names = {404: "NotFoundError", 405: "MethodNotAllowed", 401: "AuthenticationError", 413: "InputTooLargeError"}
    return problem_response(
        request,
        exc.status_code,
        type_name=names.get(exc.status_code, "HttpError"),
        detail=str(exc.detail),
        headers=getattr(exc, "headers", None),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        request,
        500,
        type_name="InternalError",
        detail="the server failed to handle this request",
        suggestion="This is a bug in the service, not in your request: report it with the request_id.",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MonoQuantError, _mono_quant_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses (for route decorators)."""
    descriptions = {
        400: "Invalid input (InputError): corrupt file, missing calibration data...",
        401: "Missing or unknown API key.",
        404: "No such resource for this API key.",
        409: "Conflict with the resource's current state.",
        413: "Upload larger than the server's limit.",
        415: "File format refused (pickled module, TorchScript, .pt2) or unknown.",
        416: "Range not satisfiable (Content-Range: bytes */size).",
        422: "Invalid parameters (ConfigurationError), with errors[] for schema errors.",
        507: "The server's disk is full; nothing was stored. Retry later.",
    }
    from app.schemas import Problem

    return {
        status: {"model": Problem, "description": descriptions[status], "content": {PROBLEM_MEDIA_TYPE: {}}}
        for status in statuses
    }
