"""Calibration data in every shape users have it, fed to a model one batch at a time.

Accepted: a tensor or a dict of keyword-input tensors (split along dim 0 into batches of
``batch_size``), a list or tuple of
batches, a DataLoader or any iterable of batches. Each batch is a tensor (``model(t)``), a
tuple/list (``model(*batch)``) or a dict (``model(**batch)``). Samples are counted along dim 0
of the first tensor of each batch; ``max_samples`` stops the feed once reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mono_quant.errors import InputError, MonoQuantError

__all__ = [
    "iter_calibration_batches",
    "run_batch",
    "run_calibration_batch",
    "count_batches",
    "batch_rows",
    "first_tensor",
    "slice_batch",
]


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (itself, a tuple's, a dict's), else None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def batch_rows(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor (InputError when it holds none)."""
    tensor = first_tensor(batch)
    if tensor is None:
        raise InputError(
            f"calibration batch of type {type(batch).__name__} holds no tensor",
            suggestion="Give calibration batches as tensors, tuples of tensors or dicts of tensors.",
        )
    return int(tensor.shape[0]) if tensor.dim() else 1


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` (along dim 0) of every tensor of a batch; other values as they are."""

    def cut(value):
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() else value

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def _truncate(batch: Any, rows: int) -> Any:
    return slice_batch(batch, 0, rows)


def iter_calibration_batches(data: Any, max_samples: int, batch_size: int = 32) -> Iterator[tuple[Any, int]]:
    """Yield ``(batch, samples_in_batch)`` until ``max_samples`` samples were given."""
    if data is None:
        raise InputError(
            "static quantization needs calibration data, got None",
            suggestion="Pass calibration_data (a tensor, a list of batches or a DataLoader), "
            "or use dynamic=True, which needs no data.",
        )
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise InputError(
                f"calibration tensor has no samples (shape {tuple(data.shape)})",
                suggestion="Pass a tensor whose first dimension indexes samples.",
            )
        batches: Any = (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    elif isinstance(data, dict):
        # A dict of keyword inputs whose first dimension indexes samples: split like a tensor.
        rows = batch_rows(data)
        batches = (
            {k: v[i : i + batch_size] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in data.items()}
            for i in range(0, rows, batch_size)
        )
    else:
        try:
            batches = iter(data)
        except TypeError:
            raise InputError(
                f"calibration_data of type {type(data).__name__} is not iterable",
                suggestion="Pass a tensor, a list of batches or a DataLoader.",
            ) from None
    given = 0
    for batch in batches:
        if given >= max_samples:
            break
        size = batch_rows(batch)
        if given + size > max_samples:
            batch, size = _truncate(batch, max_samples - given), max_samples - given
        given += size
        yield batch, size
    if given == 0:
        raise InputError(
            "calibration_data is empty",
            suggestion="Pass at least one batch of representative inputs.",
        )


def count_batches(data: Any, max_samples: int, batch_size: int = 32) -> int | None:
    """Number of batches :func:`iter_calibration_batches` will yield, when cheap to know."""
    if isinstance(data, torch.Tensor) and data.dim():
        rows = min(int(data.shape[0]), max_samples)
        return -(-rows // batch_size)
    if isinstance(data, (list, tuple)):
        return len(data)
    if isinstance(data, dict):
        return -(-min(batch_rows(data), max_samples) // batch_size)
    return None


def run_batch(model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    """Call ``model`` on one batch, moved to ``device``."""

    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, torch.Tensor):
        return model(move(batch))
    if isinstance(batch, dict):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return model(*[move(v) for v in batch])
    raise InputError(
        f"calibration batch of type {type(batch).__name__} is not supported",
        suggestion="Give batches as tensors, tuples of tensors or dicts of tensors.",
    )


def run_calibration_batch(model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    """:func:`run_batch` for data the caller gave: a model that fails on it raises InputError
    (what the batch must look like), not the model's own exception."""
    try:
        return run_batch(model, batch, device)
    except MonoQuantError:
        raise
    except Exception as exc:
        raise InputError(
            f"the model failed on a calibration batch: {type(exc).__name__}: {exc}",
            suggestion="Calibration batches must be valid model inputs: a tensor is passed as model(x), a tuple as "
            "model(*batch), a dict as model(**batch).",
        ) from exc
