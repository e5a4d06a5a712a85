"""What an uploaded file is, checked before a job is queued; and safe unpacking of model zips.

:func:`inspect_upload` runs in the API process on every upload. It reads headers only
(safetensors) or uses the weights-only unpickler (``.pt``), never anything that can run code:
a pickled module, TorchScript or ``.pt2`` is refused with 415, or with the operator's
``trusted_inputs`` switch accepted *unopened* (it is only ever loaded in a worker process).
A zip must be a Hugging Face model folder: ``config.json`` plus safetensors weights, whose
headers are checked inside the archive by the library's one strict header parser. A zip is
never trusted for its sizes: each member's compression ratio is bounded at submission (a
zip bomb is refused with 413), and :func:`extract_model_zip` counts the real bytes it
writes and stops at the limit. Tokenizer files next to config.json (``tokenizer.json``,
``tokenizer_config.json``, vocab files...) are extracted too; the upload's details say
whether it has a tokenizer (text calibration and eval need one).

Text uploads (calibration or eval text, :data:`TEXT_FORMATS`): ``.txt`` is split into
documents at blank lines (a line with only whitespace ends a document; single newlines stay
inside it); ``.jsonl`` has one JSON object per line with a string ``"text"`` (blank lines are
skipped). Both are checked at submission: UTF-8, at most ``max_text_bytes``, at least one
non-empty document, every jsonl line an object with a string ``text``.
"""

from __future__ import annotations

import codecs
import json
import shutil
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from app.config import Settings
from mono_quant.errors import InputError, InputTooLargeError, MonoQuantError, UnsupportedFormatError
from mono_quant.io.handlers import inspect_model_file, read_safetensors_header_from, sniff_format, zip_member_count

__all__ = [
    "MODEL_FORMATS",
    "TRUSTED_ONLY_FORMATS",
    "TEXT_FORMATS",
    "inspect_upload",
    "extract_model_zip",
    "named_for_the_user",
    "iter_text_documents",
]

TRUSTED_ONLY_FORMATS = frozenset({"pickle", "torch_zip", "torchscript", "pt2"})
# format name stored on the upload -> how the worker loads it
MODEL_FORMATS = ("safetensors", "pytorch", "hf_zip", *sorted(TRUSTED_ONLY_FORMATS))
# Files of a model folder the worker needs; anything else in the zip is ignored, never extracted.
_FOLDER_FILES = ("config.json", "generation_config.json")
# Tokenizer files transformers' AutoTokenizer reads (no Python files: remote code is never run).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
# Any one of these holds a vocabulary: with it the upload "has a tokenizer".
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_MAX_TOKENIZER_FILE_BYTES = 256 * 1024 * 1024
# Text uploads: file name suffix -> format stored on the upload.
TEXT_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl"}
_COPY_CHUNK = 1024 * 1024
# Members smaller than this are never refused for their ratio (a tiny JSON file compresses well).
_RATIO_FLOOR_BYTES = 1024 * 1024
_DEFAULTS = Settings.model_construct()  # field defaults only: the environment is read by the caller


def _export_hint() -> str:
    return "Export a state_dict to safetensors: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."


def inspect_upload(path: Path, kind: str, settings: Settings, filename: str = "upload") -> dict[str, Any]:
    """Check an uploaded file; returns ``{"format": ..., ...details}``.

    ``kind`` is "model" or "dataset"; ``filename`` is the name the caller gave the file, used
    in messages instead of the server's storage name. Raises InputError (400: corrupt,
    truncated, not a state_dict) or UnsupportedFormatError (415).
    """
    try:
        with named_for_the_user(path, filename):
            return _inspect(path, kind, settings, filename)
    except UnsupportedFormatError:
        if sniff_format(path) == "unknown" and filename.lower().endswith(".safetensors"):
            # Named .safetensors but not even a readable header: a truncated or corrupt file.
            raise InputError(
                f"{filename} is not a valid safetensors file (too short or corrupt header)",
                suggestion="The file may be truncated or corrupt; re-export it and upload it again.",
            ) from None
        raise


def _inspect(path: Path, kind: str, settings: Settings, filename: str = "upload") -> dict[str, Any]:
    text_format = TEXT_FORMATS.get(PurePosixPath(filename.lower()).suffix)
    if kind == "dataset" and text_format is not None:
        return _inspect_text(path, text_format, settings, filename)
    sniffed = sniff_format(path)
    if sniffed == "zip":
        if kind != "model":
            raise UnsupportedFormatError(
                "calibration data cannot be a zip archive",
                suggestion="Upload the input tensors as one safetensors file (input_ids, attention_mask).",
            )
        return _inspect_model_zip(path, settings)
    if sniffed in TRUSTED_ONLY_FORMATS - {"torch_zip", "pickle"}:
        if settings.trusted_inputs and kind == "model":
            return {"format": sniffed, "trusted": True}
        raise UnsupportedFormatError(
            f"the upload is a {'TorchScript' if sniffed == 'torchscript' else 'torch.export (.pt2)'} archive, "
            "which can run code when loaded; refused",
            suggestion=_export_hint(),
        )
    try:
        details = inspect_model_file(
            path,
            trusted=False,
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_tensors=settings.max_safetensors_tensors,
        )
    except UnsupportedFormatError:
        if settings.trusted_inputs and kind == "model" and sniffed in TRUSTED_ONLY_FORMATS:
            return {"format": sniffed, "trusted": True}
        raise
    details = {key: value for key, value in details.items() if key != "metadata"}
    if not details.get("tensors"):
        raise InputError("the upload holds no tensors", suggestion="Save a non-empty state_dict of tensors.")
    return details


def _text_error(filename: str, what: str, text_format: str) -> InputError:
    rule = (
        'one JSON object per line with a string "text", e.g. {"text": "The cat sat."}'
        if text_format == "jsonl"
        else "UTF-8 text, documents separated by blank lines"
    )
    return InputError(f"{filename}: {what}", suggestion=f"Send {rule}.")


def iter_text_documents(path: Path, text_format: str, filename: str = "upload") -> Iterator[str]:
    """The documents of a text upload, in order (streamed: memory holds one document).

    ``text``: documents are separated by blank lines; ``jsonl``: one ``{"text": ...}`` object
    per line. Raises InputError (naming the line) for invalid UTF-8 or a bad jsonl line.

    Example:
        >>> list(iter_text_documents(Path("calibration.txt"), "text"))  # doctest: +SKIP
        ['First paragraph,\nstill the first.', 'Second paragraph.']
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    paragraph: list[str] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise _text_error(filename, f"line {number} is not valid UTF-8 ({exc.reason})", text_format) from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte order mark is not text
            if text_format == "jsonl":
                document = _jsonl_text(line, number, filename)
                if document is not None:
                    yield document
            elif line.strip():
                paragraph.append(line.rstrip("\r\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _text_error(filename, "the file ends inside a UTF-8 character (truncated?)", text_format) from None
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_text(line: str, number: int, filename: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except RecursionError:
        raise _text_error(filename, f"line {number} nests JSON too deeply", "jsonl") from None
    except json.JSONDecodeError as exc:
        raise _text_error(filename, f"line {number} is not valid JSON ({exc.msg})", "jsonl") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        got = type(record).__name__ if not isinstance(record, dict) else f"keys {sorted(record)[:5]}"
        raise _text_error(filename, f'line {number} is not an object with a string "text" (got {got})', "jsonl")
    return record["text"] if record["text"].strip() else None


def _inspect_text(path: Path, text_format: str, settings: Settings, filename: str) -> dict[str, Any]:
    size = path.stat().st_size
    if size > settings.max_text_bytes:
        raise InputTooLargeError(
            f"{filename} is {size} bytes, more than the text limit of {settings.max_text_bytes}",
            suggestion="Send less text (a few hundred thousand tokens calibrate and evaluate well), or ask the "
            "operator to raise MONOQUANT_MAX_TEXT_BYTES.",
        )
    documents = characters = 0
    for document in iter_text_documents(path, text_format, filename):
        documents += 1
        characters += len(document)
    if not documents:
        raise _text_error(filename, "the file holds no text", text_format)
    return {"format": text_format, "documents": documents, "characters": characters}


@contextmanager
def named_for_the_user(path: Path, filename: str) -> Iterator[None]:
    """Errors raised inside name the file as its uploader called it, never by the server's
    storage name (a blob id). Use around anything that reads an upload, in the API or a worker.

    Example:
        >>> with named_for_the_user(blob_path, "model.safetensors"):  # doctest: +SKIP
        ...     load_model(blob_path)
    """
    try:
        yield
    except MonoQuantError as exc:
        if path.name not in exc.message:
            raise
        raise type(exc)(exc.message.replace(path.name, filename), exc.suggestion) from None


def _zip_bomb(name: str, declared: int, compressed: int, settings: Settings) -> InputTooLargeError:
    return InputTooLargeError(
        f"{name} in the zip expands {declared / max(compressed, 1):.0f}x ({compressed} -> {declared} bytes), "
        f"more than the limit of {settings.max_zip_compression_ratio:g}x: model weights barely compress, so this "
        "looks like a zip bomb",
        suggestion="Zip the model folder with a standard tool (or store the weights uncompressed: zip -0), "
        "or upload model.safetensors itself.",
    )


def _check_sizes(members: list[zipfile.ZipInfo], settings: Settings) -> None:
    """Refuse archives whose declared sizes could fill the disk, before reading any member."""
    for info in members:
        if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > settings.max_zip_compression_ratio * max(
            info.compress_size, 1
        ):
            raise _zip_bomb(info.filename, info.file_size, info.compress_size, settings)
    total = sum(info.file_size for info in members)
    limit = min(settings.max_zip_uncompressed_bytes, settings.max_job_write_bytes)
    if total > limit:
        raise InputTooLargeError(
            f"the zip expands to {total} bytes, more than the limit of {limit}",
            suggestion="Upload a smaller model, or ask the operator to raise MONOQUANT_MAX_ZIP_UNCOMPRESSED_BYTES.",
        )


def _check_member_count(path: Path, settings: Settings) -> None:
    """Refuse an archive of too many entries before zipfile builds an object for each."""
    members = zip_member_count(path)
    if members is not None and members > settings.max_zip_members:
        raise InputTooLargeError(
            f"the zip has {members} entries, more than the limit of {settings.max_zip_members}",
            suggestion="Zip only the model folder (config.json, weights, tokenizer files), "
            "or ask the operator to raise MONOQUANT_MAX_ZIP_MEMBERS.",
        )


def _load_config(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, Any]:
    if info.file_size > _MAX_CONFIG_BYTES:
        raise InputError("config.json is too large", suggestion="Upload the model's real config.json.")
    with archive.open(info) as handle:
        raw = handle.read(_MAX_CONFIG_BYTES + 1)  # never more than the limit, whatever the zip declares
    if len(raw) > _MAX_CONFIG_BYTES:
        raise InputError("config.json is too large", suggestion="Upload the model's real config.json.")
    try:
        config = json.loads(raw)
    except RecursionError:
        raise InputError(
            "config.json nests objects or arrays too deeply to be a model config",
            suggestion="Use the config.json saved by transformers (save_pretrained).",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config.json is not valid JSON: {exc}", suggestion="Fix config.json.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError("config.json has no model_type", suggestion="Use the config.json saved by transformers.")
    return config


def _inspect_model_zip(path: Path, settings: Settings) -> dict[str, Any]:
    _check_member_count(path, settings)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {_member_name(info.filename): info for info in archive.infolist() if not info.is_dir()}
            root = _folder_root(members)
            config_info = members.get(f"{root}config.json")
            if config_info is None:
                raise UnsupportedFormatError(
                    "the zip holds no config.json: only zipped Hugging Face model folders are accepted",
                    suggestion="Zip the model folder (config.json + model.safetensors), or upload a .safetensors file.",
                )
            weights = [info for name, info in members.items() if _is_weight_file(name, root)]
            tokenizer_files = {
                name[len(root) :]: info for name, info in members.items() if _in_folder(name, root, _TOKENIZER_FILES)
            }
            _check_sizes([config_info, *weights, *tokenizer_files.values()], settings)
            _check_tokenizer_files(archive, tokenizer_files)
            config = _load_config(archive, config_info)
            if config.get("auto_map"):
                raise UnsupportedFormatError(
                    "this model needs custom remote code (config.json has auto_map), which is never run",
                    suggestion="Use an architecture that ships with transformers, or upload a safetensors state_dict.",
                )
            if not weights:
                raise InputError(
                    "the zip has config.json but no safetensors weights next to it",
                    suggestion="Include model.safetensors (or model-0000x-of-0000N.safetensors shards).",
                )
            tensors = sum(_check_member_header(archive, info, settings) for info in weights)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise InputError(
            f"the zip archive is corrupt or uses an unsupported compression: {exc}",
            suggestion="Re-create the zip with a standard tool (deflate or stored) and upload it again.",
        ) from None
    return {
        "format": "hf_zip",
        "model_type": config["model_type"],
        "architectures": config.get("architectures"),
        "weight_files": len(weights),
        "tensors": tensors,
        "tokenizer": any(name in tokenizer_files for name in _VOCABULARY_FILES),
    }


def _member_name(name: str) -> str:
    return name.replace("\\", "/")


def _folder_root(members: dict[str, zipfile.ZipInfo]) -> str:
    """ "" when config.json is at the top of the zip, "folder/" when the zip holds one folder."""
    if "config.json" in members:
        return ""
    configs = [name for name in members if PurePosixPath(name).name == "config.json" and name.count("/") == 1]
    return configs[0].rsplit("/", 1)[0] + "/" if len(configs) == 1 else ""


def _in_folder(name: str, root: str, names: tuple[str, ...]) -> bool:
    return name.startswith(root) and name[len(root) :] in names


def _check_tokenizer_files(archive: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo]) -> None:
    """Tokenizer files are bounded in size; the JSON ones must parse and name no remote code."""
    for name, info in files.items():
        if info.file_size > _MAX_TOKENIZER_FILE_BYTES:
            raise InputTooLargeError(
                f"{name} in the zip is {info.file_size} bytes, more than the limit of {_MAX_TOKENIZER_FILE_BYTES}",
                suggestion="Include the tokenizer files transformers saves (save_pretrained), nothing else.",
            )
    config_info = files.get("tokenizer_config.json")
    if config_info is None:
        return
    with archive.open(config_info) as handle:
        raw = handle.read(_MAX_CONFIG_BYTES + 1)
    try:
        config = json.loads(raw) if len(raw) <= _MAX_CONFIG_BYTES else None
    except (RecursionError, json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise InputError(
            "tokenizer_config.json in the zip is not a JSON object (or is larger than 4 MiB)",
            suggestion="Use the tokenizer files saved by transformers (tokenizer.save_pretrained).",
        )
    if config.get("auto_map"):
        raise UnsupportedFormatError(
            "this tokenizer needs custom remote code (tokenizer_config.json has auto_map), which is never run",
            suggestion="Use a tokenizer class that ships with transformers, or drop the tokenizer files.",
        )


def _is_weight_file(name: str, root: str) -> bool:
    if not name.startswith(root) or "/" in name[len(root) :]:
        return False
    base = name[len(root) :]
    return base == "model.safetensors" or (base.startswith("model-") and base.endswith(".safetensors"))


def _check_member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings) -> int:
    """Validate a safetensors member's header inside the zip (the library's strict parser,
    the same the worker uses); returns its tensor count."""
    with archive.open(info) as handle:
        header, _ = read_safetensors_header_from(
            handle,
            info.file_size,
            f"{info.filename} in the zip",
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_tensors=settings.max_safetensors_tensors,
        )
    return len(header)


def extract_model_zip(path: Path, destination: Path, settings: Settings | None = None) -> Path:
    """Extract the model folder files of a checked zip into ``destination``; returns the folder.

    Only ``config.json``, ``generation_config.json``, the tokenizer files and the safetensors
    weights are written,
    under server-chosen names (no member path is ever joined to the filesystem as given).
    Sizes and ratios are checked again (the blob may predate today's limits), and the real
    bytes written are counted: past ``max_job_write_bytes`` (or a member's declared size)
    extraction stops and the partial folder is removed.
    """
    settings = settings or _DEFAULTS
    limit = min(settings.max_zip_uncompressed_bytes, settings.max_job_write_bytes)
    _check_member_count(path, settings)
    destination.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = {_member_name(info.filename): info for info in archive.infolist() if not info.is_dir()}
            root = _folder_root(members)
            wanted = [
                (name, info)
                for name, info in members.items()
                if _in_folder(name, root, _FOLDER_FILES + _TOKENIZER_FILES) or _is_weight_file(name, root)
            ]
            _check_sizes([info for _, info in wanted], settings)
            for name, info in wanted:
                target = destination / PurePosixPath(name).name
                member_written = 0
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(_COPY_CHUNK):
                        member_written += len(chunk)
                        written += len(chunk)
                        if member_written > info.file_size:  # a member lying about its size
                            raise InputError(
                                f"{name} in the zip is larger than its declared size",
                                suggestion="Re-create the zip with a standard tool.",
                            )
                        if written > limit:
                            raise InputTooLargeError(
                                f"the zip expands to more than the limit of {limit} bytes",
                                suggestion="Upload a smaller model, or ask the operator to raise "
                                "MONOQUANT_MAX_JOB_WRITE_BYTES.",
                            )
                        sink.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        _remove_tree(destination)
        raise InputError(
            f"the zip archive is corrupt: {exc}", suggestion="Re-create the zip and upload it again."
        ) from None
    except BaseException:
        _remove_tree(destination)
        raise
    return destination


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
