"""validate_quantization: is a quantized model good enough, and does it survive a save?

Measures, comparing with the original float model (or state_dict):

* per-layer weight SQNR (dB) between each original weight and the weight the quantized
  layer actually computes with;
* output SQNR (dB) and mean cosine similarity on ``sample_inputs``, when given;
* size before and after (bytes) and the compression ratio;
* a save/reload check: the model is written to a temporary mono_quant file, read back, and
  every tensor must come back bitwise identical.

Thresholds default by bit width (int8: weights 25 dB, outputs 15 dB; int4: 10 dB / 8 dB;
fp16/bf16: 35 dB / 30 dB). ``on_failure`` says what a failed check does: "error" raises
:class:`ValidationError`, "warn" records it and emits a warning, "ignore" only records it.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.core.calibration import run_batch
from mono_quant.core.quantizers import model_size_bytes
from mono_quant.core.schemes import sqnr
from mono_quant.errors import ConfigurationError, InputError, ValidationError
from mono_quant.modules import QuantizedModule

__all__ = ["ValidationResult", "validate_quantization"]

_DEFAULT_THRESHOLDS = {8: (25.0, 15.0), 4: (10.0, 8.0), 16: (35.0, 30.0)}
_ON_FAILURE = ("error", "warn", "ignore")


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_quantization`; ``bool(result)`` is ``passed``."""

    passed: bool = True
    layer_sqnr_db: dict[str, float] = field(default_factory=dict)
    mean_weight_sqnr_db: float | None = None
    min_weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    output_cosine: float | None = None
    original_size_bytes: int = 0
    quantized_size_bytes: int = 0
    compression_ratio: float | None = None
    reload_ok: bool | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None if math.isnan(value) else (1e9 if value > 0 else -1e9)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return {k: clean(v) for k, v in asdict(self).items()}


def _state_size(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _layer_sqnrs_module(original: nn.Module, quantized: nn.Module) -> dict[str, float]:
    out = {}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedModule):
            try:
                source = original.get_submodule(name)
            except AttributeError:
                continue
            if hasattr(module, "weight_names"):  # recurrent: all weight matrices together
                reference = torch.cat([getattr(source, n).detach().flatten() for n in module.weight_names])
            else:
                reference = source.weight
            out[name] = sqnr(reference.float(), module.dequantized_weight().to(reference.device))
        elif hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
            try:
                source = original.get_submodule(name)
            except AttributeError:
                continue
            if module.weight.dtype != source.weight.dtype:  # fp16 / bf16 cast layer
                out[name] = sqnr(source.weight.float(), module.weight.float())
    return out


def _layer_sqnrs_state(original: Mapping[str, torch.Tensor], quantized: Mapping, layers: dict) -> dict[str, float]:
    from mono_quant.io.formats import dequantized_layer_weight

    out = {}
    for layer, config in layers.items():
        reference = original.get(f"{layer}.weight")
        if reference is None:
            continue
        weight = dequantized_layer_weight(quantized, layer, config, tuple(reference.shape))
        if weight is not None:
            out[layer] = sqnr(reference.float(), weight)
    return out


@torch.inference_mode()
def _outputs(model: nn.Module, sample_inputs: Any) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), None)
    if device is None:
        device = next((b.device for b in model.buffers()), torch.device("cpu"))
    out = run_batch(model, sample_inputs, device)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    elif isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    return out.float()


def _reload_check(quantized: nn.Module | Mapping, layers: dict | None) -> tuple[bool, str | None]:
    from mono_quant.io.formats import load_model, save_model

    state = quantized.state_dict() if isinstance(quantized, nn.Module) else quantized
    with tempfile.TemporaryDirectory(prefix="mono_quant_validate_") as tmp:
        path = save_model(quantized, Path(tmp) / "check.safetensors", layers=layers)
        reloaded = load_model(path)
    for name, tensor in state.items():
        other = reloaded.get(name)
        if other is None:
            return False, f"tensor {name!r} is missing after reload"
        if other.dtype != tensor.dtype or other.shape != tensor.shape or not torch.equal(other, tensor.cpu()):
            return False, f"tensor {name!r} differs after reload"
    return True, None


def validate_quantization(
    original: nn.Module | Mapping[str, torch.Tensor],
    quantized: nn.Module | Mapping[str, torch.Tensor],
    sample_inputs: Any = None,
    on_failure: str = "error",
    sqnr_threshold_db: float | None = None,
    output_sqnr_threshold_db: float | None = None,
    bits: int | None = None,
    layers: dict[str, dict] | None = None,
    check_reload: bool = True,
) -> ValidationResult:
    """Compare a quantized model with its original; see the module docstring.

    ``sample_inputs`` is one batch as for calibration (a tensor, a tuple of positional
    inputs or a dict of keyword inputs). ``layers`` is needed only for state_dict results
    (``QuantizationResult.validate`` passes it).

    Example:
        >>> result = validate_quantization(model, qmodel, torch.randn(8, 64))  # doctest: +SKIP
        >>> result.output_sqnr_db  # doctest: +SKIP
        31.4
    """
    if on_failure not in _ON_FAILURE:
        raise ConfigurationError(
            f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}",
            suggestion="Use on_failure='error' to raise, 'warn' to warn, 'ignore' to only record.",
        )
    is_module = isinstance(quantized, nn.Module)
    if is_module and not isinstance(original, nn.Module):
        raise InputError(
            f"the quantized model is an nn.Module, so the original must be one too, got {type(original).__name__}",
            suggestion="Pass the float nn.Module that was quantized (result.validate() does this for you).",
        )
    if not is_module and not isinstance(quantized, Mapping):
        raise InputError(
            f"cannot validate an object of type {type(quantized).__name__}",
            suggestion="Pass result.model from mono_quant.quantize() (an nn.Module or a state_dict).",
        )
    if not is_module and isinstance(original, nn.Module):
        original = original.state_dict()  # a state_dict result is compared tensor by tensor
    res = ValidationResult()
    if is_module:
        layers = layers or {}
        res.layer_sqnr_db = _layer_sqnrs_module(original, quantized)
        res.original_size_bytes = model_size_bytes(original)
        res.quantized_size_bytes = model_size_bytes(quantized)
        bits = bits or next((m.config.bits for m in quantized.modules() if isinstance(m, QuantizedModule)), None)
    else:
        layers = layers or {}
        res.layer_sqnr_db = _layer_sqnrs_state(original, quantized, layers)
        res.original_size_bytes = _state_size(original)
        res.quantized_size_bytes = _state_size(quantized)
        bits = bits or next((c.get("bits") for c in layers.values() if "bits" in c), None)
    bits = bits or 16
    weight_floor, output_floor = _DEFAULT_THRESHOLDS.get(bits, _DEFAULT_THRESHOLDS[8])
    weight_floor = weight_floor if sqnr_threshold_db is None else sqnr_threshold_db
    output_floor = output_floor if output_sqnr_threshold_db is None else output_sqnr_threshold_db
    if res.quantized_size_bytes:
        res.compression_ratio = res.original_size_bytes / res.quantized_size_bytes

    finite = [v for v in res.layer_sqnr_db.values() if math.isfinite(v)]
    if res.layer_sqnr_db:
        res.mean_weight_sqnr_db = sum(finite) / len(finite) if finite else math.inf
        res.min_weight_sqnr_db = min(res.layer_sqnr_db.values())
        low = {k: round(v, 1) for k, v in res.layer_sqnr_db.items() if v < weight_floor}
        if low:
            res.errors.append(f"{len(low)} layer(s) below the weight SQNR threshold of {weight_floor} dB: {low}")
    else:
        res.warnings.append("no quantized layer found: nothing was compared")

    if sample_inputs is not None:
        if not is_module:
            res.warnings.append("output checks need a runnable model; a state_dict has no forward")
        else:
            ref = _outputs(original, sample_inputs)
            out = _outputs(quantized, sample_inputs).to(ref.device)
            res.output_sqnr_db = sqnr(ref, out)
            res.output_cosine = float(
                torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1), dim=-1).mean()
            )
            if res.output_sqnr_db < output_floor:
                res.errors.append(
                    f"output SQNR {res.output_sqnr_db:.1f} dB is below the threshold of {output_floor} dB"
                )

    if is_module:
        candidates = [
            m for m in original.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LSTM))
        ]
        quantized_count = sum(1 for m in quantized.modules() if isinstance(m, QuantizedModule))
        if candidates and quantized_count >= len(candidates) and bits != 16:
            res.warnings.append(
                "every layer is quantized, including the first and last: if accuracy matters, "
                "try exclude=[<output head>]"
            )
    if check_reload:
        res.reload_ok, why = _reload_check(quantized, layers if not is_module else None)
        if not res.reload_ok:
            res.errors.append(f"save/reload check failed: {why}")

    res.passed = not res.errors
    if not res.passed:
        message = "quantization validation failed: " + "; ".join(res.errors)
        if on_failure == "error":
            raise ValidationError(
                message,
                suggestion="Use more bits, a smaller group_size, exclude sensitive layers "
                "(exclude=[...]), or lower the thresholds if this quality is acceptable.",
            )
        if on_failure == "warn":
            warnings.warn(message, stacklevel=2)
    return res
