"""Streaming multipart parsing: files go straight to disk in chunks, hashed, under a byte limit.

FastAPI's ``UploadFile`` would spool the whole body to a temporary file before the handler
runs, so a byte limit could only be checked after the fact and every file would be written
twice. Here the body is fed to ``python_multipart`` as it arrives: file parts are written to
temporary files in ``data_dir/tmp`` (sha256 computed on the way), other fields are kept as
small strings, and the first byte past ``max_upload_bytes`` ends the request with 413.
Memory stays flat whatever the upload size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.config import Settings
from app.storage import BlobWriter, Storage
from mono_quant.errors import InputError, InputTooLargeError, UnsupportedFormatError

__all__ = ["ReceivedFile", "MultipartForm", "read_multipart"]

_MAX_PARTS = 64


@dataclass
class ReceivedFile:
    """A file part written completely to a temporary path (moved into place by the caller)."""

    field: str
    filename: str
    writer: BlobWriter

    @property
    def path(self) -> Path:
        return self.writer.temp_path

    @property
    def size(self) -> int:
        return self.writer.size

    @property
    def sha256(self) -> str:
        return self.writer.sha256


@dataclass
class MultipartForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)

    def discard(self) -> None:
        """Remove every temporary file not moved into place."""
        for received in self.files.values():
            received.writer.discard()

    def scalar_fields(self, list_fields: set[str]) -> dict[str, object]:
        """Fields as a dict for model validation: repeated list fields stay lists."""
        return {name: values if name in list_fields else values[-1] for name, values in self.fields.items()}


def _too_large(limit: int) -> InputTooLargeError:
    return InputTooLargeError(
        f"request body is larger than the limit of {limit} bytes",
        suggestion="Upload a smaller file, or ask the operator to raise MONOQUANT_MAX_UPLOAD_BYTES.",
    )


def _form_error(name: str, message: str, error_type: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("form", name), "msg": message, "type": error_type}])


class _PartCollector:
    """Turns parser callbacks into fields and file writes (callbacks are sync and cheap; the
    file writes they queue are done in a worker thread)."""

    def __init__(self, storage: Storage, settings: Settings, file_fields: frozenset[str]) -> None:
        self.storage = storage
        self.settings = settings
        self.file_fields = file_fields
        self.form = MultipartForm()
        self.pending_writes: list[tuple[BlobWriter, bytes]] = []
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._writer: BlobWriter | None = None
        self._text = bytearray()
        self._parts = 0

    def on_part_begin(self) -> None:
        self._headers = {}
        self._writer = None
        self._text = bytearray()
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise InputError(f"the form has more than {_MAX_PARTS} parts", suggestion="Send fewer form fields.")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        if not name:
            raise InputError(
                "a multipart part has no name",
                suggestion="Send each part with Content-Disposition: form-data; name=...",
            )
        self._name = name
        if name in self.file_fields:
            if name in self.form.files:
                raise _form_error(name, f"the file field {name!r} was sent twice", "duplicate_file")
            filename = options.get(b"filename", b"").decode("utf-8", errors="replace")[:255] or name
            self._writer = self.storage.writer(limit=self.settings.max_upload_bytes)
            self.form.files[name] = ReceivedFile(name, filename, self._writer)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writer is not None:
            self.pending_writes.append((self._writer, data[start:end]))
            return
        self._text += data[start:end]
        if len(self._text) > self.settings.max_form_field_bytes:
            raise _form_error(
                self._name, f"form field is longer than {self.settings.max_form_field_bytes} bytes", "too_long"
            )

    def on_part_end(self) -> None:
        if self._writer is None:
            try:
                value = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise _form_error(self._name, "form field is not valid UTF-8", "unicode_error") from None
            self.form.fields.setdefault(self._name, []).append(value)

    def flush_writes(self) -> None:
        writes, self.pending_writes = self.pending_writes, []
        for writer, chunk in writes:
            writer.write(chunk)


async def read_multipart(
    request: Request, storage: Storage, settings: Settings, file_fields: frozenset[str]
) -> MultipartForm:
    """Read a ``multipart/form-data`` body: ``file_fields`` become files on disk, the rest strings.

    Raises InputTooLargeError (413) past ``settings.max_upload_bytes``, UnsupportedFormatError
    (415) for another content type, InputError (400) for a malformed body. On error every
    temporary file is removed.
    """

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UnsupportedFormatError(
            f"expected a multipart/form-data body, got {content_type.decode(errors='replace') or 'no content type'}",
            suggestion="Send the files and parameters as multipart/form-data "
            "(curl -F model=@model.safetensors -F bits=8 ...).",
        )
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    collector = _PartCollector(storage, settings, file_fields)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            try:
                parser.write(chunk)
            except (InputError, RequestValidationError):
                raise
            except Exception as exc:  # python_multipart raises its own errors on a malformed body
                raise InputError(
                    f"malformed multipart body: {exc}", suggestion="Check the request's multipart encoding."
                ) from exc
            if collector.pending_writes:
                await anyio.to_thread.run_sync(collector.flush_writes)
        try:
            parser.finalize()
        except Exception as exc:
            raise InputError(
                f"incomplete multipart body: {exc}", suggestion="The upload was cut short; send it again."
            ) from exc
        for file in collector.form.files.values():
            await anyio.to_thread.run_sync(file.writer.close)
    except BaseException:
        collector.form.discard()
        raise
    return collector.form
