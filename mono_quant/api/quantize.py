"""quantize(): the one entry point."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.api.result import QuantizationResult
from mono_quant.core.options import VALID_BITS, VALID_SCHEMES, QuantizeOptions, option_specs
from mono_quant.core.progress import Progress
from mono_quant.core.quantizers import QuantizationInfo, mode_name, quantize_planned
from mono_quant.errors import ConfigurationError, InputError, MonoQuantError
from mono_quant.io.formats import plan_state_dict, quantize_state_dict
from mono_quant.io.handlers import prepare_model

__all__ = ["quantize", "VALID_BITS", "VALID_SCHEMES", "QUANTIZE_OPTIONS"]

# name -> help of every keyword option (the one declaration is QuantizeOptions)
QUANTIZE_OPTIONS = {
    name: spec.help for name, (_, spec) in option_specs().items() if name not in ("bits", "dynamic", "scheme")
}


def quantize(
    model: nn.Module | Mapping[str, torch.Tensor] | str,
    bits: int = 8,
    dynamic: bool = False,
    scheme: str | None = None,
    calibration_data: Any = None,
    show_progress: bool = False,
    **kwargs: Any,
) -> QuantizationResult:
    """Quantize a model and return a :class:`QuantizationResult`.

    Args:
        model: an ``nn.Module`` (never modified), a state_dict, or a path to a
            ``.safetensors`` / weights-only ``.pt`` file.
        bits: 8 (int8), 4 (int4 group-wise weights) or 16 (fp16; bf16 with ``dtype="bf16"``).
        dynamic: int8 only. True: weights int8, activations quantized per token at run time,
            no data needed. False: static, activation qparams calibrated on
            ``calibration_data`` (required). ``weight_only=True`` skips activation
            quantization altogether (most accurate int8, no data needed).
        scheme: weight grid, "symmetric" or "asymmetric". Default: symmetric for int8,
            asymmetric for int4.
        calibration_data: a tensor, a list of batches, or a DataLoader: static int8's activation
            ranges, GPTQ's Hessians (``method="gptq"``), SmoothQuant's scales (int8 with
            activations), the accuracy target's layer ranking and, without ``eval_data``, its
            held-out eval part. Refused by modes that would not use it.
        show_progress: draw tqdm bars over layers and calibration batches.
        **kwargs: advanced options, see ``QUANTIZE_OPTIONS`` (unknown names are an error), and
            ``eval_data`` (batches like ``calibration_data``): what ``max_accuracy_loss`` is
            measured on.

    ``max_accuracy_loss=0.01`` quantizes to an accuracy target: the most sensitive layers
    move up one precision at a time (int4 g128 -> g32 -> int8 -> float) until the relative
    loss on ``eval_data`` (perplexity for causal LMs, output cosine otherwise) is at most 1%;
    ``result.info.layer_overrides`` says which layers moved and ``info.metrics
    ["accuracy_target"]`` lists every trial. See ``mono_quant.core.tuning``.

    bits=4 and bits=16 never need data: int4 is weight-only (groups of ``group_size``
    input features share a scale chosen by an MSE clipping search), and 16 bits is a cast.
    State dicts and files have no forward: they take weight-only / dynamic / cast modes and
    are quantized tensor by tensor (load the result with ``load_quantized``).

    Bad arguments raise at once (ConfigurationError / InputError). A failure while
    quantizing valid input comes back as ``result.success == False`` with ``result.errors``.

    Example:
        >>> import torch.nn as nn
        >>> result = quantize(nn.Sequential(nn.Linear(64, 64)), bits=8, dynamic=True)
        >>> bool(result), result.info.selected_layers
        (True, ['0'])
    """
    eval_data = kwargs.pop("eval_data", None)
    options = QuantizeOptions.from_kwargs(bits=bits, dynamic=dynamic, scheme=scheme, **kwargs)
    if eval_data is not None and options.max_accuracy_loss is None:
        raise ConfigurationError(
            "eval_data was given without max_accuracy_loss, which is what uses it",
            suggestion="Pass max_accuracy_loss (e.g. 0.01) to quantize to an accuracy target measured on "
            "eval_data, or drop eval_data (result.validate() measures a result on inputs of your choice).",
        )
    options.check_data(calibration_data is not None, eval_data is not None)
    device = _resolve_device(options.device)
    source = prepare_model(model, trusted=options.trusted)
    if isinstance(source, nn.Module) and device is not None and source is not model:
        source = source.to(device)  # loaded from a file here: ours to move
    if isinstance(source, nn.Module) and device is not None:
        module_device = next((p.device for p in source.parameters()), device)
        if module_device.type != device.type:
            raise ConfigurationError(
                f"device={device.type!r} was given, but the model is on {module_device.type}",
                suggestion=f"Move the model first (model.to({device.type!r})): quantization never moves or "
                "modifies the caller's model. A model is quantized where it is.",
            )
    if isinstance(source, Mapping):
        if options.is_static:
            raise InputError(
                "static quantization needs a model it can run, but a state_dict / weights file has no forward",
                suggestion="Pass the nn.Module itself for static quantization, or use dynamic=True "
                "(or weight_only=True) on the weights.",
            )
        if options.rotation:
            raise InputError(
                "rotation needs the model's structure (which norms feed which layers) and checks the rotated "
                "model on random tokens, but a state_dict / weights file has no forward",
                suggestion="Pass the nn.Module itself for rotation=True, or drop rotation.",
            )
        if options.max_accuracy_loss is not None:
            raise InputError(
                "max_accuracy_loss measures the model on data, but a state_dict / weights file has no forward",
                suggestion="Pass the nn.Module itself, or give the layers their precisions with layer_overrides.",
            )
        if options.effective_method == "gptq" or calibration_data is not None:
            raise InputError(
                "calibration needs a model it can run, but a state_dict / weights file has no forward",
                suggestion="Pass the nn.Module itself for GPTQ, smoothing or static quantization, or use a "
                "data-free mode (method='rtn' or 'hqq') on the weights.",
            )
        return _quantize_state_dict(source, options, show_progress, device)
    try:
        quantized, info = quantize_planned(
            source, options, calibration_data, show_progress=show_progress, eval_data=eval_data
        )
    except (ConfigurationError, InputError):
        raise
    except (MonoQuantError, RuntimeError, ValueError, TypeError) as exc:
        info = QuantizationInfo(dtype=options.quantized_dtype, symmetric=options.symmetric)
        return QuantizationResult(model=None, info=info, errors=[f"{type(exc).__name__}: {exc}"], original=source)
    errors = _check_runs(quantized, source)
    return QuantizationResult(
        model=quantized if not errors else None,
        info=info,
        warnings=list(info.warnings),
        errors=errors,
        original=source,
    )


@torch.inference_mode()
def _check_runs(quantized: nn.Module, original: nn.Module) -> list[str]:
    """Success means usable: a model that says how to call it (transformers' ``dummy_inputs``)
    must run one forward after quantization. Returns the errors (empty when it runs)."""
    dummy = getattr(original, "dummy_inputs", None)
    if not isinstance(dummy, Mapping) or not dummy:
        return []
    device = next((p.device for p in original.parameters()), torch.device("cpu"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dummy.items()}
    try:
        quantized(**inputs)
    except Exception as exc:  # whatever breaks, the result is not usable
        return [f"the quantized model does not run on its dummy_inputs: {type(exc).__name__}: {exc}"]
    return []


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigurationError(
            f"device={device!r} is not a device", suggestion="Use device='cpu' or device='cuda'."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "device='cuda' was given but no CUDA device is available",
            suggestion="Use device='cpu', or run on a machine with a GPU and a CUDA build of torch.",
        )
    return resolved


def _quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], options: QuantizeOptions, show_progress: bool, device
) -> QuantizationResult:
    started = time.perf_counter()
    plan = plan_state_dict(state_dict, options)
    progress = Progress(show_progress, options.progress_callback)
    tensors, layers = quantize_state_dict(state_dict, plan, progress, device=device)
    mode = {"cast": "cast", "dynamic": "dynamic", "static": "static"}.get(mode_name(options), "weight_only")
    info = QuantizationInfo(
        selected_layers=list(layers),
        skipped_layers=list(plan.skipped),
        skip_reasons=dict(plan.skipped),
        dtype=options.quantized_dtype,
        symmetric=options.symmetric,
        mode="state_dict_" + mode,
        group_size=options.effective_group_size if options.bits == 4 else None,
        layer_configs=layers,
        original_size_bytes=sum(t.numel() * t.element_size() for t in state_dict.values()),
        quantized_size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        duration_s=time.perf_counter() - started,
        warnings=list(plan.notes),
    )
    if not layers:
        info.warnings.append("no tensor was quantized: no floating '*.weight' of 2+ dimensions matched")
    return QuantizationResult(
        model=tensors, info=info, warnings=list(info.warnings), original=state_dict, layers=layers
    )
