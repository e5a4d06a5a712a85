"""Exports to the formats serving stacks load: one module per foreign format.

Each format module defines ``FORMAT``, an :class:`ExportFormat`: its name, the file or folder
it writes, a ``check`` that refuses modes the format cannot represent (ConfigurationError
naming the modes it can; called before any work, so the service can answer 422 at
submission), and ``export`` that writes the file from a quantized model. Exporters read the
quantized layers (``QuantizedModule.config`` and ``quantized_weight()``): they never decide
per layer again.

Example:
    >>> result = quantize(model, bits=4)                      # doctest: +SKIP
    >>> result.save("model.gguf", format="gguf", tokenizer=tok)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mono_quant.errors import ConfigurationError

__all__ = [
    "ExportFormat",
    "EXPORT_FORMATS",
    "get_format",
    "ARTIFACT_NAMES",
    "check_facts",
    "override_precisions",
    "options_for_formats",
]


@dataclass(frozen=True)
class ExportFormat:
    """A foreign format: ``check(info_or_options)`` raises ConfigurationError for what it
    cannot represent; ``export(model, path, **kwargs)`` writes it and returns the path."""

    name: str
    artifact_name: str  # what the service calls the artifact (a folder is zipped)
    consumers: str  # who loads it, for error messages and docs
    check: Callable[..., None]
    export: Callable[..., Any]
    float_zero_points: bool = True  # stores HQQ's float zero points
    input_scales: bool = True  # stores SmoothQuant scales that could not be folded into a layer before
    # its consumer quantizes activations per token as we do, so smoothing folded into the layer
    # before still pays where input scales are not stored (False: llama.cpp quantizes its own way)
    folded_smoothing: bool = True


# format name -> module defining FORMAT (imported on first use: each needs its own packages)
_FORMAT_MODULES = {
    "compressed-tensors": "mono_quant.export.compressed_tensors",
    "gguf": "mono_quant.export.gguf",
    "onnx": "mono_quant.export.onnx",
}
EXPORT_FORMATS = tuple(_FORMAT_MODULES)
ARTIFACT_NAMES = {"compressed-tensors": "compressed-tensors.zip", "gguf": "model.gguf", "onnx": "model.onnx"}


def get_format(name: str) -> ExportFormat:
    """The :class:`ExportFormat` called ``name``; ConfigurationError listing the valid ones."""
    module = _FORMAT_MODULES.get(name)
    if module is None:
        raise ConfigurationError(
            f"unknown export format {name!r}",
            suggestion=f"Use one of: {', '.join(EXPORT_FORMATS)} (or no format for mono_quant's safetensors).",
        )
    return importlib.import_module(module).FORMAT


def check_facts(info: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What a format's ``check`` decides on: ``mode``, ``bits``, ``symmetric``, ``group_size``,
    ``layer_configs``, ``layer_overrides`` (``{pattern: precision name}``) and ``skipped_layers``,
    from a QuantizationInfo, a QuantizeOptions (the service checks a request with it before
    anything is quantized: the overrides are then all it knows of the layers), a plain dict, or
    keyword facts."""
    facts: dict[str, Any] = {}
    if info is not None:
        if isinstance(info, Mapping):
            facts.update(info)
        elif hasattr(info, "activation") and hasattr(info, "weight_only"):  # a QuantizeOptions
            facts["bits"], facts["symmetric"] = info.bits, info.symmetric
            facts["group_size"] = info.effective_group_size if info.bits == 4 else info.group_size
            facts["mode"] = "cast" if info.bits == 16 else {"none": "weight_only"}.get(info.activation, info.activation)
            facts["layer_overrides"] = dict(info.layer_overrides or ())
        else:
            for key in (
                "mode",
                "bits",
                "symmetric",
                "group_size",
                "layer_configs",
                "layer_overrides",
                "skipped_layers",
            ):
                facts[key] = getattr(info, key, None)
    facts.update(overrides)
    facts["layer_configs"] = facts.get("layer_configs") or {}
    facts["layer_overrides"] = dict(facts.get("layer_overrides") or {})
    facts["skipped_layers"] = list(facts.get("skipped_layers") or ())
    return facts


def override_precisions(facts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``[(pattern, Precision)]`` of the ``layer_overrides`` in ``facts`` (see :func:`check_facts`):
    what a check can refuse at submission, before any layer name is known."""
    from mono_quant.core.options import parse_precision

    return [(pattern, parse_precision(name)) for pattern, name in (facts.get("layer_overrides") or {}).items()]


def options_for_formats(options: Any, formats: Any, has_calibration: bool) -> Any:
    """``options`` (a QuantizeOptions) with the defaults every format in ``formats`` can store,
    for callers that know the formats before quantizing (the CLI's ``--format``, the service's
    ``export_formats``). Where ``method`` was left unset in an asymmetric int4 run and a format stores
    integer zero points only (compressed-tensors), the run rounds to nearest instead of using
    HQQ (unless calibration data came for HQQ alone: the check then refuses, suggesting GPTQ).
    Where a format has no per-channel input scale, int8 with activations smooths only the layers
    whose scale folds into the layer before (``smoothing_folded_only``: compressed-tensors, whose
    consumers quantize activations per token as we do), or, with ``smoothing`` unset and no
    other use for calibration data, not at all when the format's consumer gains nothing from it
    (GGUF: llama.cpp quantizes activations itself). What the caller set is kept, for the
    format's ``check`` to refuse if it cannot be stored."""
    import dataclasses

    chosen = [get_format(name) for name in formats or ()]
    changes: dict[str, Any] = {}
    data_only_for_hqq = has_calibration and options.max_accuracy_loss is None
    if (
        options.method is None
        and options.uses_importance()
        and not options.symmetric  # symmetric HQQ keeps the integer zero point
        and not data_only_for_hqq
        and not all(f.float_zero_points for f in chosen)
    ):
        changes["method"] = "rtn"
    unstored = [f for f in chosen if not f.input_scales]
    if unstored and options.effective_smoothing(True) is not None:
        pointless = not all(f.folded_smoothing for f in unstored)
        if pointless and options.smoothing is None and (not has_calibration or options.is_static):
            changes["smoothing"] = 0.0  # static's data has its use: activation ranges
        elif options.smoothing_folded_only is None:
            changes["smoothing_folded_only"] = True
    return dataclasses.replace(options, **changes) if changes else options
