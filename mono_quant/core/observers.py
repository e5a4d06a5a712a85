"""Calibration observers: watch activations, then propose activation qparams.

An observer sees tensors through :meth:`Observer.observe` and answers
:meth:`Observer.calculate_qparams` with a per-tensor ``(scale, zero_point)`` for a
:class:`~mono_quant.core.schemes.QuantSpec`. Observers are chosen by name through a registry::

    observer = create_observer("histogram")

* ``minmax``          running min / max: exact cover of what was seen; outliers widen the grid.
* ``moving_average``  exponential moving average of per-batch min / max: robust to a rare
                      extreme batch.
* ``histogram``       a histogram of everything seen; the clipping range is the one that
                      minimises the expected squared quantization error (rounding noise inside
                      the range plus clipping error outside it), so a few outliers no longer
                      cost every other value its resolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mono_quant.core.schemes import QuantSpec, choose_qparams
from mono_quant.errors import ConfigurationError, InputError

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "OBSERVERS",
    "register_observer",
    "create_observer",
]

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator adding an observer to the registry under ``name``."""

    def decorate(cls: type[Observer]) -> type[Observer]:
        OBSERVERS[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def create_observer(name: str, **kwargs) -> Observer:
    """A fresh observer by registry name; unknown names raise ConfigurationError.

    Example:
        >>> create_observer("minmax").registry_name
        'minmax'
    """
    try:
        cls = OBSERVERS[name]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"unknown observer_type {name!r}",
            suggestion=f"Use one of: {', '.join(sorted(OBSERVERS))}.",
        ) from None
    return cls(**kwargs)


class Observer:
    """Base class: subclasses implement ``observe`` and ``_range``."""

    registry_name = ""

    def __init__(self) -> None:
        self.batches_seen = 0

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def calculate_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``(scale, zero_point)`` for ``spec`` from everything observed."""
        if self.batches_seen == 0:
            raise InputError(
                f"the {self.registry_name} observer saw no data",
                suggestion="Check that the calibration data reaches this layer "
                "(the layer may be unused by the model's forward).",
            )
        lo, hi = self._range(spec)
        return choose_qparams(lo, hi, spec)

    @staticmethod
    def _finite(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise InputError(
                "calibration produced NaN or Inf activations",
                suggestion="Check the calibration inputs (scaling, dtype) and that the float "
                "model runs correctly on them.",
            )
        return x


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum of everything observed."""

    def __init__(self) -> None:
        super().__init__()
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(self._finite(x))
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self.batches_seen += 1

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


@register_observer("moving_average")
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (``averaging_constant`` = weight
    of the newest batch)."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ConfigurationError(
                f"averaging_constant must be in (0, 1], got {averaging_constant!r}",
                suggestion="Use a small value such as 0.01 (the default).",
            )
        self.averaging_constant = averaging_constant

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(self._finite(x))
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)
        self.batches_seen += 1


@register_observer("histogram")
class HistogramObserver(Observer):
    """Histogram of all observed values; chooses the clipping range minimising the L2 error.

    The histogram covers the running [min, max]; when a batch falls outside, the old counts
    are re-binned onto the wider range. For each candidate range (a grid of symmetric or
    asymmetric shrinkings of the full range), the expected squared error is the rounding noise
    ``scale^2 / 12`` for every value inside plus the squared clipping distance of every value
    outside; the best candidate wins.
    """

    def __init__(self, bins: int = 2048, search_steps: int = 128) -> None:
        super().__init__()
        self.bins = bins
        self.search_steps = search_steps
        self.histogram: torch.Tensor | None = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = self._finite(x).flatten()
        lo, hi = torch.aminmax(x)
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        if self.histogram is None:
            self.min_val, self.max_val = lo, torch.maximum(hi, lo + 1e-8)
            self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        elif lo < self.min_val or hi > self.max_val:
            self._rebin(torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val))
        counts = torch.histc(x, self.bins, float(self.min_val), float(self.max_val))
        self.histogram += counts.double()
        self.batches_seen += 1

    def _rebin(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        # Move each old bin's count to the new bin holding the old bin's centre.
        old_width = (self.max_val - self.min_val) / self.bins
        centres = self.min_val + old_width * (torch.arange(self.bins, device=old_width.device) + 0.5)
        new_width = (new_max - new_min) / self.bins
        index = ((centres - new_min) / new_width).long().clamp_(0, self.bins - 1)
        rebinned = torch.zeros_like(self.histogram)
        rebinned.index_add_(0, index, self.histogram)
        self.histogram, self.min_val, self.max_val = rebinned, new_min, new_max

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        width = (self.max_val - self.min_val) / self.bins
        centres = self.min_val + width * (torch.arange(self.bins, device=hist.device) + 0.5)
        centres = centres.double()
        levels = spec.qmax - spec.qmin
        fractions = torch.linspace(1.0, 1.0 / self.search_steps, self.search_steps)
        candidates = []
        if spec.symmetric:
            bound = torch.maximum(-self.min_val, self.max_val)
            candidates = [(-bound * f, bound * f) for f in fractions]
        else:
            # Shrink the two ends independently on a coarse grid.
            coarse = fractions[:: max(1, self.search_steps // 32)]
            candidates = [(self.min_val * a, self.max_val * b) for a in coarse for b in coarse]
        best, best_error = candidates[0], None
        for lo, hi in candidates:
            lo_d, hi_d = lo.double(), hi.double()
            scale = (hi_d - lo_d) / levels
            inside = (centres >= lo_d) & (centres <= hi_d)
            clip = torch.where(centres < lo_d, lo_d - centres, centres - hi_d).clamp_(min=0)
            error = (hist * torch.where(inside, scale * scale / 12, clip * clip)).sum()
            if best_error is None or error < best_error:
                best, best_error = (lo, hi), error
        return best[0].float(), best[1].float()
