"""Calibration data in every shape users have it, fed to a model one batch at a time.

Accepted: a tensor or a dict of keyword-input tensors (split along dim 0 into batches of
``batch_size``), a list or tuple of
batches, a DataLoader or any iterable of batches. Each batch is a tensor (``model(t)``), a
tuple/list (``model(*batch)``) or a dict (``model(**batch)``). Samples are counted along dim 0
of the first tensor of each batch; ``max_samples`` stops the feed once reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mono_quant.errors import InputError, MonoQuantError

__all__ = [
    "ObservedForward",
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


class _EndOfForward(BaseException):
    """Ends a calibration forward from a hook. A BaseException, like GeneratorExit: a model's
    own ``except Exception`` does not catch it, and run_calibration_batch lets it through."""


class ObservedForward:
    """Runs calibration batches through ``model`` and ends each forward once nothing after it
    reaches an ``observed`` module: what the hooks collect is the same, the tail is not computed.

    The first batch runs whole, with a pre-hook on every submodule recording the call order;
    the tail is everything after the last call of an observed module (a decoder's final norm
    and its ``lm_head`` when that is not observed: SmolLM2's tied 49152 x 576 head is ~19% of
    the forward's FLOPs). Later batches end at the tail's first module, but only once they have
    made as many observed calls as the first (a model whose calls depend on its input runs
    whole). Nothing is skipped when that module also ran before the tail, or when the first
    batch left an observed module unreached.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> forward = ObservedForward(net, [net[0]], torch.device("cpu"))
        >>> _ = forward.run(torch.randn(3, 4)); _ = forward.run(torch.randn(3, 4))
        >>> forward.skipped
        1
    """

    def __init__(self, model: torch.nn.Module, observed: Iterable[torch.nn.Module], device: torch.device) -> None:
        self.model = model
        self.device = device
        self.skipped = 0  # batches that ended early
        self._observed = {id(module) for module in observed}
        self._batches = 0
        self._calls = 0  # observed calls in the current batch
        self._expected: int | None = None
        self._handles: list[Any] = []

    def run(self, batch: Any) -> None:
        """One batch (:func:`run_calibration_batch`); its output is not returned."""
        self._calls = 0
        if self._batches == 0:
            self._first(batch)
        else:
            try:
                run_calibration_batch(self.model, batch, self.device)
            except _EndOfForward:
                self.skipped += 1
        self._batches += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ObservedForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _first(self, batch: Any) -> None:
        order: list[torch.nn.Module] = []
        modules = [module for module in self.model.modules() if module is not self.model]
        recorders = [module.register_forward_pre_hook(lambda mod, _args: order.append(mod)) for module in modules]
        try:
            run_calibration_batch(self.model, batch, self.device)
        finally:
            for handle in recorders:
                handle.remove()
        if not self._observed <= {id(module) for module in order}:
            return  # an observed module the first batch never reached might run in the tail later
        last = max((i for i, module in enumerate(order) if id(module) in self._observed), default=None)
        if last is None or last + 1 >= len(order):
            return
        stop = order[last + 1]
        if any(module is stop for module in order[: last + 1]):
            return
        self._expected = sum(1 for module in order[: last + 1] if id(module) in self._observed)
        for module in {id(m): m for m in order[: last + 1] if id(m) in self._observed}.values():
            self._handles.append(module.register_forward_pre_hook(self._count))
        self._handles.append(stop.register_forward_pre_hook(self._end))

    def _count(self, _module: torch.nn.Module, _args: tuple) -> None:
        self._calls += 1

    def _end(self, _module: torch.nn.Module, _args: tuple) -> None:
        if self._calls == self._expected:
            raise _EndOfForward
