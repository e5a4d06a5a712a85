"""OpenAPI for multipart endpoints whose body is streamed by hand (see app/uploads.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["multipart_body"]

_BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}


def multipart_body(
    files: dict[str, str], params: type[BaseModel] | None = None, extra: dict[str, dict] | None = None
) -> dict[str, Any]:
    """``openapi_extra`` describing a multipart/form-data body: file fields, then the fields of
    ``params`` (one pydantic model) and ``extra`` string fields."""
    properties: dict[str, Any] = {name: {**_BINARY, "description": text} for name, text in files.items()}
    properties.update(extra or {})
    if params is not None:
        schema = params.model_json_schema(by_alias=True, mode="validation")
        properties.update(schema.get("properties", {}))
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
        }
    }
