"""Which layers get quantized: by type, name pattern and size; skips always carry a reason.

Patterns match the dotted module name (``encoder.layer.0.attention.self.query``): shell-style
globs (``*.query``, ``encoder.layer.[0-3].*``) or regular expressions prefixed with ``re:``
(``re:.*\\.(query|key)$``, matched with ``re.fullmatch``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from mono_quant.errors import ConfigurationError

__all__ = ["LAYER_TYPES", "DEFAULT_LAYER_TYPES", "LayerSelection", "SkippedLayer", "select_layers"]

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "embedding": (nn.Embedding,),
    "lstm": (nn.LSTM,),
    "gru": (nn.GRU,),
}
DEFAULT_LAYER_TYPES = tuple(LAYER_TYPES)


def _as_tuple(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigurationError(
            f"{what} must be a string or a list of strings, got {type(value).__name__}",
            suggestion=f"Pass {what}=['*.query', 're:.*attention.*'].",
        ) from None
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{what} entries must be strings, got {item!r}",
                suggestion=f"Pass {what} as a list of glob or 're:' patterns.",
            )
    return items


def _compile(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigurationError(
                f"invalid regular expression {pattern!r}: {exc}",
                suggestion="Fix the expression after 're:', or use a glob pattern like '*.query'.",
            ) from None
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class LayerSelection:
    """Selection rules; validated and normalised on construction.

    * ``layer_types``: names from :data:`LAYER_TYPES` (default: all of them).
    * ``include``: if given, only layers whose name matches one pattern are candidates.
    * ``exclude``: layers whose name matches one pattern are skipped.
    * ``min_params``: layers with fewer parameters are skipped (tiny layers gain nothing).

    Example:
        >>> LayerSelection(layer_types=["linear"], exclude=["*.classifier"]).layer_types
        ('linear',)
    """

    layer_types: tuple[str, ...] = DEFAULT_LAYER_TYPES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = 0
    _include_re: tuple[re.Pattern, ...] = field(default=(), repr=False, compare=False)
    _exclude_re: tuple[re.Pattern, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        types = _as_tuple(self.layer_types, "layer_types") or DEFAULT_LAYER_TYPES
        normalised = tuple(t.lower() for t in types)
        unknown = [t for t in normalised if t not in LAYER_TYPES]
        if unknown:
            raise ConfigurationError(
                f"unknown layer type(s) {unknown}",
                suggestion=f"Use any of: {', '.join(LAYER_TYPES)}.",
            )
        if not isinstance(self.min_params, int) or self.min_params < 0:
            raise ConfigurationError(
                f"min_params must be a non-negative integer, got {self.min_params!r}",
                suggestion="Pass min_params=0 to quantize layers of any size.",
            )
        include = _as_tuple(self.include, "include")
        exclude = _as_tuple(self.exclude, "exclude")
        object.__setattr__(self, "layer_types", normalised)
        object.__setattr__(self, "include", include)
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "_include_re", tuple(_compile(p) for p in include))
        object.__setattr__(self, "_exclude_re", tuple(_compile(p) for p in exclude))

    def type_name(self, module: nn.Module) -> str | None:
        """The selection name of ``module``'s type if it is one we quantize, else None."""
        for name in self.layer_types:
            if type(module) in LAYER_TYPES[name]:
                return name
        return None


@dataclass(frozen=True)
class SkippedLayer:
    """A layer that was a candidate but is not quantized, and why."""

    name: str
    layer_type: str
    reason: str


def select_layers(
    model: nn.Module, selection: LayerSelection
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """Split the model's quantizable layers into selected and skipped (with reasons).

    Layers of types outside ``selection.layer_types`` are not candidates at all.
    """
    selected: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        type_name = selection.type_name(module)
        if type_name is None:
            continue
        if selection._include_re and not any(p.fullmatch(name) for p in selection._include_re):
            skipped.append(SkippedLayer(name, type_name, "not matched by any include pattern"))
            continue
        matched = next((p.pattern for p in selection._exclude_re if p.fullmatch(name)), None)
        if matched is not None:
            skipped.append(SkippedLayer(name, type_name, "matched an exclude pattern"))
            continue
        n_params = sum(p.numel() for p in module.parameters(recurse=False))
        if n_params < selection.min_params:
            skipped.append(SkippedLayer(name, type_name, f"{n_params} parameters < min_params={selection.min_params}"))
            continue
        selected.append((name, module))
    return selected, skipped
