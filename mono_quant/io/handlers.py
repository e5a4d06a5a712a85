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
from typing import Any, BinaryIO

import torch
from torch import nn

from mono_quant.errors import InputError, UnsupportedFormatError

__all__ = [
    "SAFETENSORS_DTYPES",
    "parse_safetensors_header",
    "read_safetensors_header",
    "read_safetensors_header_from",
    "sniff_format",
    "zip_member_count",
    "load_state_dict_file",
    "inspect_model_file",
    "prepare_model",
    "torch_load_weights_only",
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
# A parsed header costs far more memory than its bytes (one dict per tensor): 1.7 M empty
# tensors in 100 MB of JSON take over 1 GiB. The tensor count is bounded before parsing.
_MAX_TENSORS = 1_000_000
_MAX_ZIP_MEMBERS = 100_000
_MAX_RANK = 64  # no model tensor comes close; bounds the work per entry
_EXPORT_HINT = (
    "Save a state_dict to safetensors instead: "
    "`from safetensors.torch import save_file; save_file(model.state_dict(), 'model.safetensors')`."
)


def _corrupt(name: str, why: str) -> InputError:
    return InputError(
        f"{name} is not a valid safetensors file: {why}",
        suggestion="Re-export the file (safetensors.torch.save_file); it may be truncated or corrupt.",
    )


class _HeaderTooBig(Exception):
    pass


class _DuplicateKey(Exception):
    pass


def _strict_objects(max_objects: int) -> Any:
    """An ``object_pairs_hook`` that refuses duplicate keys (json.loads would silently keep the
    last) and stops parsing once more than ``max_objects`` objects were built, so memory stays
    bounded whatever the header holds."""
    built = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal built
        built += 1
        if built > max_objects:
            raise _HeaderTooBig(max_objects)
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise _DuplicateKey(key)
            result[key] = value
        return result

    return hook


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_safetensors_header(
    raw: bytes, data_size: int, name: str = "file", *, max_tensors: int = _MAX_TENSORS
) -> tuple[dict[str, dict], dict[str, str]]:
    """Check a safetensors header (the JSON after the 8-byte length) against ``data_size``,
    the bytes that follow it. The one strict parser of the format, used for files on disk and
    members of zip archives alike; ``name`` is the file name used in messages.

    Rules: a JSON object without duplicate keys, at most ``max_tensors`` entries; every
    tensor has a known dtype, a shape of at most 64 non-negative ints (not bools) and two int offsets;
    its byte span is exactly ``numel * itemsize``; spans are contiguous from 0 to the end of
    the data (no hole, no overlap, nothing past or short of the end); ``__metadata__`` maps
    strings to strings. Raises :class:`InputError` naming the first problem.

    Example:
        >>> raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
        >>> parse_safetensors_header(raw, data_size=8)[0]["w"]["shape"]
        [2]
    """
    try:
        # one object per tensor, plus the header itself and __metadata__
        header = json.loads(raw, object_pairs_hook=_strict_objects(max_tensors + 2))
    except _DuplicateKey as exc:
        raise _corrupt(name, f"the key {exc.args[0]!r} appears twice in the header") from None
    except _HeaderTooBig:
        raise _corrupt(name, f"the header declares more than {max_tensors} tensors (the limit)") from None
    except RecursionError:
        raise _corrupt(name, "the header nests JSON deeper than a safetensors header can") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(name, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(name, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(name, "__metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise _corrupt(name, f"the header declares more than {max_tensors} tensors (the limit)")
    spans = []
    for tensor, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(name, f"entry {tensor!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(name, f"tensor {tensor!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(name, f"tensor {tensor!r} has an invalid shape {shape!r}")
        if len(shape) > _MAX_RANK:
            raise _corrupt(name, f"tensor {tensor!r} has {len(shape)} dimensions (at most {_MAX_RANK})")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(name, f"tensor {tensor!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype]:
            raise _corrupt(name, f"tensor {tensor!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        if offsets[1] > data_size:
            raise _corrupt(name, f"tensor {tensor!r} ends at byte {offsets[1]}, past the data ({data_size} bytes)")
        spans.append((offsets[0], offsets[1], tensor))
    spans.sort()
    position, previous = 0, None
    for start, end, tensor in spans:
        if start < position:
            raise _corrupt(name, f"tensors {previous!r} and {tensor!r} overlap")
        if start > position:
            where = f"after tensor {previous!r}" if previous is not None else "at the start of the data"
            raise _corrupt(name, f"{start - position} bytes {where} belong to no tensor (a hole in data_offsets)")
        position, previous = end, tensor
    if position != data_size:
        raise _corrupt(
            name, f"the tensors cover {position} bytes but the data holds {data_size} (bytes no tensor describes)"
        )
    return header, metadata


def read_safetensors_header_from(
    handle: BinaryIO,
    total_size: int,
    name: str = "file",
    *,
    max_header_bytes: int = _MAX_HEADER_BYTES,
    max_tensors: int = _MAX_TENSORS,
) -> tuple[dict[str, dict], dict[str, str]]:
    """:func:`read_safetensors_header` for an open binary stream of ``total_size`` bytes
    (a zip member, for instance), positioned at its start."""
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise _corrupt(name, f"only {len(prefix)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > total_size - 8:
        raise _corrupt(name, f"header length {header_len} exceeds the file ({total_size} bytes)")
    if header_len > max_header_bytes:
        raise _corrupt(name, f"header length {header_len} is over the limit of {max_header_bytes} bytes")
    raw = handle.read(header_len)
    if len(raw) < header_len:
        raise _corrupt(name, f"the header is cut short ({len(raw)} of {header_len} bytes)")
    return parse_safetensors_header(raw, total_size - 8 - header_len, name, max_tensors=max_tensors)


def read_safetensors_header(
    path: str | os.PathLike, *, max_header_bytes: int = _MAX_HEADER_BYTES, max_tensors: int = _MAX_TENSORS
) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header without reading any tensor data.

    Returns ``(tensors, metadata)`` where ``tensors`` maps names to ``{"dtype", "shape",
    "data_offsets"}``. Raises :class:`InputError` naming the first problem found (see
    :func:`parse_safetensors_header` for the rules). ``max_header_bytes`` and
    ``max_tensors`` bound the memory parsing may take.

    Example:
        >>> tensors, metadata = read_safetensors_header("model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            return read_safetensors_header_from(
                handle, file_size, path.name, max_header_bytes=max_header_bytes, max_tensors=max_tensors
            )
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", suggestion="Check the path and permissions.") from None


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def zip_member_count(path: str | os.PathLike) -> int | None:
    """How many entries a zip archive declares, read from its end-of-central-directory record
    (the last bytes of the file) without parsing any entry; None when there is no record.

    ``zipfile.ZipFile`` builds an object per entry as it opens an archive: a small file of a
    million empty entries would cost the reader hundreds of MB. Check this count first.
    """
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail_start = max(size - (_EOCD.size + 65535), 0)
        handle.seek(tail_start)
        tail = handle.read()
        found = tail.rfind(b"PK\x05\x06")
        if found < 0 or len(tail) - found < _EOCD.size:
            return None
        entries = _EOCD.unpack_from(tail, found)[4]
        locator_at = found - _ZIP64_LOCATOR.size
        if entries == 0xFFFF and locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
            zip64_offset = _ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
            handle.seek(zip64_offset)
            record = handle.read(_ZIP64_EOCD.size)
            if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
                entries = _ZIP64_EOCD.unpack(record)[6]
        return entries


def sniff_format(path: str | os.PathLike) -> str:
    """One of "safetensors", "torch_zip", "torchscript", "pt2", "pickle", "zip", "unknown"."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        members = zip_member_count(path)
        if members is None:
            return "unknown"
        if members > _MAX_ZIP_MEMBERS:
            return "zip"  # not opened: a zip of this many entries is no model file we read
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


def torch_load_weights_only(path: Path) -> Any:
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
            raise _corrupt(path.name, str(exc)[:200]) from None
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
        return _as_state_dict(torch_load_weights_only(path), path)
    raise UnsupportedFormatError(
        f"{path.name}: unrecognised model file format",
        suggestion="Use a .safetensors state_dict (preferred) or a .pt/.pth/.bin state_dict saved with torch.save.",
    )


def inspect_model_file(
    path: str | os.PathLike,
    trusted: bool = False,
    *,
    max_header_bytes: int = _MAX_HEADER_BYTES,
    max_tensors: int = _MAX_TENSORS,
) -> dict[str, Any]:
    """Check a model file without keeping its tensors: format, tensor count, dtypes, metadata.

    Safetensors files are checked from the header alone (no tensor is read), within the
    header limits given (see :func:`read_safetensors_header`).
    """
    path = Path(path)
    kind = sniff_format(path) if path.is_file() else "missing"
    if kind == "safetensors":
        header, metadata = read_safetensors_header(path, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
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
