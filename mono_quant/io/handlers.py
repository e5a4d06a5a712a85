"""Safe loading of model files and normalisation of what users pass as "a model".

Security rules (see DESIGN.md):

* ``.safetensors``: the header is parsed and checked (length, JSON, dtypes, shapes, offsets
  inside the file and non-overlapping) before any tensor is read.
* ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True)``, which refuses
  to build arbitrary Python objects.
* Pickled whole modules, TorchScript and ``torch.export`` ``.pt2`` archives can run code when
  loaded: refused with :class:`UnsupportedFormatError` unless the caller passes
  ``trusted=True`` (an explicit operator decision).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.errors import InputError, UnsupportedFormatError

__all__ = [
    "SAFETENSORS_DTYPES",
    "read_safetensors_header",
    "sniff_format",
    "load_state_dict_file",
    "inspect_model_file",
    "prepare_model",
    "load_model",
]

# safetensors dtype name -> bytes per element
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_EXPORT_HINT = (
    "Save a state_dict to safetensors instead: "
    "`from safetensors.torch import save_file; save_file(model.state_dict(), 'model.safetensors')`."
)


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(
        f"{path.name} is not a valid safetensors file: {why}",
        suggestion="Re-export the file (safetensors.torch.save_file); it may be truncated or corrupt.",
    )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header without reading any tensor data.

    Returns ``(tensors, metadata)`` where ``tensors`` maps names to ``{"dtype", "shape",
    "data_offsets"}``. Raises :class:`InputError` naming the first problem found.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"only {len(prefix)} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or header_len > file_size - 8:
                raise _corrupt(path, f"header length {header_len} exceeds the file ({file_size} bytes)")
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", suggestion="Check the path and permissions.") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype]:
            raise _corrupt(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        if offsets[1] > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {offsets[1]}, past the data ({data_size} bytes)")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise _corrupt(path, f"tensors {first!r} and {second!r} overlap")
    return header, metadata


def sniff_format(path: str | os.PathLike) -> str:
    """One of "safetensors", "torch_zip", "torchscript", "pt2", "pickle", "zip", "unknown"."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("archive_format") for n in names):
            return "pt2"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch_zip"
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        # torch's first line is a generic (ANSI-coloured) hint to retry with weights_only=False,
        # which is exactly what we refuse; name the object it found instead.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UnsupportedFormatError(
            f"{path.name} contains pickled Python objects (for example a whole nn.Module), "
            f"which can run code when loaded; refused" + (f" (it holds {found.group(1)})" if found else ""),
            suggestion=_EXPORT_HINT,
        ) from None
    except Exception as exc:  # damaged bytes fail in many ways (struct.error, EOFError, KeyError...)
        raise InputError(
            f"{path.name} could not be read as a PyTorch checkpoint: {str(exc).splitlines()[0][:200]}",
            suggestion="The file may be truncated or corrupt; re-export it, preferably as safetensors.",
        ) from None


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "mono_quant_metadata" in obj and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(
            f"{path.name} does not hold a state_dict (found {type(obj).__name__})",
            suggestion="Save model.state_dict(), a mapping of parameter names to tensors.",
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(
            f"{path.name}: entries {bad[:5]} are not name -> tensor pairs",
            suggestion="Save only model.state_dict() (parameters and buffers), not optimizer state or extras.",
        )
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike, trusted: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Load a weights file safely; returns a state_dict (or, with ``trusted=True``, whatever
    module a pickled/TorchScript file holds).

    Example:
        >>> sd = load_state_dict_file("model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}", suggestion="Check the path.")
    kind = sniff_format(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # the header checked out, so this is corrupt data
            raise _corrupt(path, str(exc)[:200]) from None
    if kind in ("torchscript", "pt2"):
        if not trusted:
            raise UnsupportedFormatError(
                f"{path.name} is a {'TorchScript' if kind == 'torchscript' else 'torch.export (.pt2)'} archive, "
                "which can run code when loaded; refused",
                suggestion=_EXPORT_HINT + " (Operators can allow such files with the trusted-input setting.)",
            )
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        return torch.export.load(str(path)).module()
    if kind in ("torch_zip", "pickle"):
        if trusted:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            return obj if isinstance(obj, nn.Module) else _as_state_dict(obj, path)
        return _as_state_dict(_torch_load_weights_only(path), path)
    raise UnsupportedFormatError(
        f"{path.name}: unrecognised model file format",
        suggestion="Use a .safetensors state_dict (preferred) or a .pt/.pth/.bin state_dict saved with torch.save.",
    )


def inspect_model_file(path: str | os.PathLike, trusted: bool = False) -> dict[str, Any]:
    """Check a model file without keeping its tensors: format, tensor count, dtypes, metadata.

    Safetensors files are checked from the header alone (no tensor is read).
    """
    path = Path(path)
    kind = sniff_format(path) if path.is_file() else "missing"
    if kind == "safetensors":
        header, metadata = read_safetensors_header(path)
        params = 0
        for entry in header.values():
            numel = 1
            for d in entry["shape"]:
                numel *= d
            params += numel
        return {
            "format": "safetensors",
            "tensors": len(header),
            "parameters": params,
            "dtypes": sorted({e["dtype"] for e in header.values()}),
            "metadata": metadata,
            "size_bytes": path.stat().st_size,
        }
    loaded = load_state_dict_file(path, trusted=trusted)
    if isinstance(loaded, nn.Module):
        return {"format": kind, "module": type(loaded).__name__, "size_bytes": path.stat().st_size}
    return {
        "format": "pytorch",
        "tensors": len(loaded),
        "parameters": sum(t.numel() for t in loaded.values()),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in loaded.values()}),
        "metadata": {},
        "size_bytes": path.stat().st_size,
    }


def prepare_model(model: Any, trusted: bool = False) -> nn.Module | dict[str, torch.Tensor]:
    """Normalise what users pass as a model: an ``nn.Module`` (used as is; the quantizers
    never modify it), a state_dict (a shallow dict copy) or a file path (loaded safely)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_state_dict_file(model, trusted=trusted)
    if isinstance(model, Mapping):
        bad = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
        if bad or not model:
            raise InputError(
                "a state_dict must be a non-empty mapping of names to tensors"
                + (f"; {bad[:5]} are not tensors" if bad else ""),
                suggestion="Pass model.state_dict(), the nn.Module itself, or a path to a weights file.",
            )
        return dict(model)
    raise InputError(
        f"cannot quantize an object of type {type(model).__name__}",
        suggestion="Pass an nn.Module, a state_dict, or a path to a .safetensors / .pt file.",
    )


# kept for the name DESIGN.md uses
_prepare_model = prepare_model


def load_model(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict safely: safetensors, or ``torch.load(weights_only=True)``; a pickled
    whole module is refused with UnsupportedFormatError (``mono_quant.io.formats.load_model``
    is the same function).

    Example:
        >>> state_dict = load_model("model.safetensors")  # doctest: +SKIP
    """
    return load_state_dict_file(path)  # trusted=False: always a state_dict, never a module
