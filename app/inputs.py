"""What an uploaded file is, checked before a job is queued; and safe unpacking of model zips.

:func:`inspect_upload` runs in the API process on every upload. It reads headers only
(safetensors) or uses the weights-only unpickler (``.pt``), never anything that can run code:
a pickled module, TorchScript or ``.pt2`` is refused with 415, or with the operator's
``trusted_inputs`` switch accepted *unopened* (it is only ever loaded in a worker process).
A zip must be a Hugging Face model folder: ``config.json`` plus safetensors weights, whose
headers are checked inside the archive.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from app.config import Settings
from mono_quant.errors import InputError, InputTooLargeError, UnsupportedFormatError
from mono_quant.io.handlers import inspect_model_file, sniff_format

__all__ = ["MODEL_FORMATS", "TRUSTED_ONLY_FORMATS", "inspect_upload", "extract_model_zip"]

TRUSTED_ONLY_FORMATS = frozenset({"pickle", "torch_zip", "torchscript", "pt2"})
# format name stored on the upload -> how the worker loads it
MODEL_FORMATS = ("safetensors", "pytorch", "hf_zip", *sorted(TRUSTED_ONLY_FORMATS))
# Files of a model folder the worker needs; anything else in the zip is ignored, never extracted.
_FOLDER_FILES = ("config.json", "generation_config.json")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


def _export_hint() -> str:
    return "Export a state_dict to safetensors: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."


def inspect_upload(path: Path, kind: str, settings: Settings, filename: str = "upload") -> dict[str, Any]:
    """Check an uploaded file; returns ``{"format": ..., ...details}``.

    ``kind`` is "model" or "dataset"; ``filename`` is the name the caller gave the file, used
    in messages instead of the server's storage name. Raises InputError (400: corrupt,
    truncated, not a state_dict) or UnsupportedFormatError (415).
    """
    try:
        return _inspect(path, kind, settings)
    except UnsupportedFormatError as exc:
        if sniff_format(path) == "unknown" and filename.lower().endswith(".safetensors"):
            # Named .safetensors but not even a readable header: a truncated or corrupt file.
            raise InputError(
                f"{filename} is not a valid safetensors file (too short or corrupt header)",
                suggestion="The file may be truncated or corrupt; re-export it and upload it again.",
            ) from None
        raise type(exc)(exc.message.replace(path.name, filename), exc.suggestion) from None
    except InputError as exc:
        raise type(exc)(exc.message.replace(path.name, filename), exc.suggestion) from None


def _inspect(path: Path, kind: str, settings: Settings) -> dict[str, Any]:
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
        details = inspect_model_file(path, trusted=False)
    except UnsupportedFormatError:
        if settings.trusted_inputs and kind == "model" and sniffed in TRUSTED_ONLY_FORMATS:
            return {"format": sniffed, "trusted": True}
        raise
    details = {key: value for key, value in details.items() if key != "metadata"}
    if not details.get("tensors"):
        raise InputError("the upload holds no tensors", suggestion="Save a non-empty state_dict of tensors.")
    return details


def _inspect_model_zip(path: Path, settings: Settings) -> dict[str, Any]:
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
            if config_info.file_size > _MAX_CONFIG_BYTES:
                raise InputError("config.json is too large", suggestion="Upload the model's real config.json.")
            try:
                config = json.loads(archive.read(config_info))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"config.json is not valid JSON: {exc}", suggestion="Fix config.json.") from None
            if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
                raise InputError(
                    "config.json has no model_type", suggestion="Use the config.json saved by transformers."
                )
            if config.get("auto_map"):
                raise UnsupportedFormatError(
                    "this model needs custom remote code (config.json has auto_map), which is never run",
                    suggestion="Use an architecture that ships with transformers, or upload a safetensors state_dict.",
                )
            weights = [info for name, info in members.items() if _is_weight_file(name, root)]
            if not weights:
                raise InputError(
                    "the zip has config.json but no safetensors weights next to it",
                    suggestion="Include model.safetensors (or model-0000x-of-0000N.safetensors shards).",
                )
            total = sum(info.file_size for info in weights) + config_info.file_size
            if total > settings.max_zip_uncompressed_bytes:
                raise InputTooLargeError(
                    f"the zip expands to {total} bytes, more than {settings.max_zip_uncompressed_bytes}",
                    suggestion="Upload a smaller model, or ask the operator to raise "
                    "MONOQUANT_MAX_ZIP_UNCOMPRESSED_BYTES.",
                )
            tensors = sum(_check_member_header(archive, info) for info in weights)
    except zipfile.BadZipFile as exc:
        raise InputError(
            f"the zip archive is corrupt: {exc}", suggestion="Re-create the zip and upload it again."
        ) from None
    return {
        "format": "hf_zip",
        "model_type": config["model_type"],
        "architectures": config.get("architectures"),
        "weight_files": len(weights),
        "tensors": tensors,
    }


def _member_name(name: str) -> str:
    return name.replace("\\", "/")


def _folder_root(members: dict[str, zipfile.ZipInfo]) -> str:
    """ "" when config.json is at the top of the zip, "folder/" when the zip holds one folder."""
    if "config.json" in members:
        return ""
    configs = [name for name in members if PurePosixPath(name).name == "config.json" and name.count("/") == 1]
    return configs[0].rsplit("/", 1)[0] + "/" if len(configs) == 1 else ""


def _is_weight_file(name: str, root: str) -> bool:
    if not name.startswith(root) or "/" in name[len(root) :]:
        return False
    base = name[len(root) :]
    return base == "model.safetensors" or (base.startswith("model-") and base.endswith(".safetensors"))


def _check_member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Validate a safetensors member's header inside the zip; returns its tensor count."""
    name = info.filename

    def corrupt(why: str) -> InputError:
        return InputError(f"{name} in the zip is not a valid safetensors file: {why}", suggestion="Re-export it.")

    with archive.open(info) as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than 8 bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, info.file_size - 8):
            raise corrupt(f"header length {header_len} is past the end of the file")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise corrupt("the header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_size = info.file_size - 8 - header_len
    count = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {key!r} has no known dtype")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise corrupt(f"tensor {key!r} has data offsets outside the file")
        count += 1
    return count


def extract_model_zip(path: Path, destination: Path) -> Path:
    """Extract the model folder files of a checked zip into ``destination``; returns the folder.

    Only ``config.json``, ``generation_config.json`` and the safetensors weights are written,
    under server-chosen names (no member path is ever joined to the filesystem as given).
    """
    destination.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as archive:
        members = {_member_name(info.filename): info for info in archive.infolist() if not info.is_dir()}
        root = _folder_root(members)
        for name, info in members.items():
            base = name[len(root) :] if name.startswith(root) else ""
            if base in _FOLDER_FILES or _is_weight_file(name, root):
                target = destination / PurePosixPath(base).name
                written = 0
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(1024 * 1024):
                        written += len(chunk)
                        if written > info.file_size:  # a member lying about its size (zip bomb)
                            raise InputError(
                                f"{name} in the zip is larger than its declared size",
                                suggestion="Re-create the zip with a standard tool.",
                            )
                        sink.write(chunk)
    return destination
