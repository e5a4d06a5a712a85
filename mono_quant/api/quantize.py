"""quantize(): the one entry point."""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.api.result import QuantizationResult
from mono_quant.core.config import resolve_dtype
from mono_quant.core.progress import Progress
from mono_quant.core.quantizers import QuantizationInfo, dynamic_quantize, static_quantize
from mono_quant.core.schemes import DEFAULT_CLIP_SEARCH_STEPS
from mono_quant.errors import ConfigurationError, InputError, MonoQuantError
from mono_quant.io.formats import _make_plan, quantize_state_dict
from mono_quant.io.handlers import prepare_model

__all__ = ["quantize", "VALID_BITS", "VALID_SCHEMES", "QUANTIZE_OPTIONS"]

VALID_BITS = (4, 8, 16)
VALID_SCHEMES = ("symmetric", "asymmetric")
# Advanced options accepted through **kwargs (anything else is an error, never ignored).
QUANTIZE_OPTIONS = {
    "group_size": "int4 group size along the input axis (default 128)",
    "observer_type": "static: 'minmax' | 'moving_average' | 'histogram'",
    "per_channel": "int8 weights per output channel (True) or per tensor (False)",
    "layer_types": "which layer kinds: linear, conv1d, conv2d, embedding, lstm, gru",
    "include": "glob / 're:' patterns of layer names to quantize",
    "exclude": "glob / 're:' patterns of layer names to leave in float",
    "min_params": "skip layers with fewer parameters",
    "num_calibration_samples": "static: calibration samples to use (default 128)",
    "calibration_batch_size": "static: rows per batch when calibration_data is one tensor",
    "activation_scheme": "static activation grid: 'asymmetric' (default) | 'symmetric'",
    "weight_only": "int8: quantize weights only, keep activations at full precision",
    "dtype": "bits=16: 'float16' (default) or 'bfloat16'",
    "embedding_bits": "bits for embedding tables in int4 runs (default 8)",
    "clip_search_steps": "int4: MSE clipping search candidates per group (default 8, 0 = min/max)",
    "progress_callback": "callable(stage: str, fraction: float) for progress reports",
    "trusted": "allow pickled modules / TorchScript files as input (code can run: trusted files only)",
    "device": "state_dict / file inputs: quantize on this device ('cuda', 'cpu'); modules stay where they are",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(bits: Any, scheme: Any, dynamic: Any, kwargs: dict[str, Any]) -> None:
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ConfigurationError(
            f"bits={bits!r} is not supported",
            suggestion="Use bits=8 (int8), bits=4 (int4 group-wise weights) or bits=16 (fp16; bf16 with dtype='bf16').",
        )
    if scheme is not None and scheme not in VALID_SCHEMES:
        raise ConfigurationError(
            f"scheme={scheme!r} is not supported",
            suggestion="Use scheme='symmetric' or scheme='asymmetric'.",
        )
    if not isinstance(dynamic, bool):
        raise ConfigurationError(f"dynamic must be True or False, got {dynamic!r}", suggestion="Pass dynamic=True.")
    unknown = [k for k in kwargs if k not in QUANTIZE_OPTIONS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, QUANTIZE_OPTIONS, n=3)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigurationError(
            f"unknown option(s): {', '.join(hints)}",
            suggestion="Valid options: " + ", ".join(sorted(QUANTIZE_OPTIONS)) + ".",
        )
    # Checked here, not only in the quantizers: the state_dict / file path has no
    # QuantizationConfig, and would otherwise skip every layer or silently use 128.
    group_size = kwargs.get("group_size")
    if group_size is not None and (not _is_int(group_size) or group_size < 2 or group_size & (group_size - 1)):
        raise ConfigurationError(
            f"group_size must be a power of two >= 2, got {group_size!r}",
            suggestion="Use group_size=32, 64 or 128 (128 is the default).",
        )
    if not _is_int(kwargs.get("embedding_bits", 8)) or kwargs.get("embedding_bits", 8) not in (4, 8):
        raise ConfigurationError(
            f"embedding_bits must be 4 or 8, got {kwargs['embedding_bits']!r}",
            suggestion="Use embedding_bits=8 (default) or embedding_bits=4.",
        )
    steps = kwargs.get("clip_search_steps", DEFAULT_CLIP_SEARCH_STEPS)
    if not _is_int(steps) or steps < 0:
        raise ConfigurationError(
            f"clip_search_steps must be a non-negative integer, got {steps!r}",
            suggestion="Use clip_search_steps=16 (default), or 0 for plain min/max ranges.",
        )
    if kwargs.get("activation_scheme", "asymmetric") not in VALID_SCHEMES:
        raise ConfigurationError(
            f"activation_scheme={kwargs['activation_scheme']!r} is not supported",
            suggestion="Use 'asymmetric' (default) or 'symmetric'.",
        )
    callback = kwargs.get("progress_callback")
    if callback is not None and not callable(callback):
        raise ConfigurationError(
            "progress_callback must be callable(stage, fraction)", suggestion="Pass a function or None."
        )


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
        calibration_data: static int8 only: a tensor, a list of batches, or a DataLoader.
        show_progress: draw tqdm bars over layers and calibration batches.
        **kwargs: advanced options, see ``QUANTIZE_OPTIONS`` (unknown names are an error).

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
    _check_arguments(bits, scheme, dynamic, kwargs)
    trusted = bool(kwargs.pop("trusted", False))
    weight_only = bool(kwargs.get("weight_only", False))
    needs_data = bits == 8 and not dynamic and not weight_only
    if needs_data and calibration_data is None:
        raise InputError(
            "static int8 quantization (dynamic=False) needs calibration_data",
            suggestion="Pass calibration_data (a tensor, a list of batches or a DataLoader), "
            "or use dynamic=True / weight_only=True, which need no data.",
        )
    device = _resolve_device(kwargs.pop("device", None))
    source = prepare_model(model, trusted=trusted)
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
        if device is not None:
            kwargs["_device"] = device
        if needs_data:
            raise InputError(
                "static quantization needs a model it can run, but a state_dict / weights file has no forward",
                suggestion="Pass the nn.Module itself for static quantization, or use dynamic=True "
                "(or weight_only=True) on the weights.",
            )
        return _quantize_state_dict(source, bits, dynamic, scheme, show_progress, kwargs)
    if kwargs.get("dtype") is not None and bits == 16 and resolve_dtype(kwargs["dtype"])[0] != 16:
        raise ConfigurationError(
            f"bits=16 takes dtype 'float16' or 'bfloat16', got {kwargs['dtype']!r}", suggestion="Pass dtype='bf16'."
        )
    try:
        quantized, info = _quantize_module(source, bits, dynamic, scheme, calibration_data, show_progress, kwargs)
    except (ConfigurationError, InputError):
        raise
    except (MonoQuantError, RuntimeError, ValueError, TypeError) as exc:
        info = QuantizationInfo(dtype=_dtype_for(bits, kwargs), symmetric=scheme != "asymmetric")
        return QuantizationResult(model=None, info=info, errors=[f"{type(exc).__name__}: {exc}"], original=source)
    return QuantizationResult(model=quantized, info=info, warnings=list(info.warnings), original=source)


def _dtype_for(bits: int, kwargs: dict) -> Any:
    if bits == 16:
        return resolve_dtype(kwargs.get("dtype") or "float16")[1]
    return torch.qint8 if bits == 8 else torch.quint4x2


def _quantize_module(model, bits, dynamic, scheme, calibration_data, show_progress, kwargs):
    selection = {k: kwargs[k] for k in ("layer_types", "include", "exclude", "min_params") if k in kwargs}
    callback = kwargs.get("progress_callback")
    symmetric = (scheme or ("asymmetric" if bits == 4 else "symmetric")) == "symmetric"
    if bits == 8 and not dynamic and not kwargs.get("weight_only", False):
        return static_quantize(
            model,
            calibration_data,
            dtype=torch.qint8,
            symmetric=symmetric,
            per_channel=kwargs.get("per_channel", True),
            observer_type=kwargs.get("observer_type", "minmax"),
            num_calibration_samples=kwargs.get("num_calibration_samples", 128),
            activation_symmetric=kwargs.get("activation_scheme", "asymmetric") == "symmetric",
            calibration_batch_size=kwargs.get("calibration_batch_size", 32),
            show_progress=show_progress,
            progress_callback=callback,
            **selection,
        )
    quantized, info = dynamic_quantize(
        model,
        dtype=_dtype_for(bits, kwargs),
        symmetric=symmetric,
        per_channel=kwargs.get("per_channel", True),
        group_size=kwargs.get("group_size", 128 if bits == 4 else None),
        weight_only=bool(kwargs.get("weight_only", False)),
        embedding_bits=kwargs.get("embedding_bits", 8),
        clip_search_steps=kwargs.get("clip_search_steps", DEFAULT_CLIP_SEARCH_STEPS),
        show_progress=show_progress,
        progress_callback=callback,
        return_info=True,
        **selection,
    )
    return quantized, info


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


def _quantize_state_dict(state_dict, bits, dynamic, scheme, show_progress, kwargs) -> QuantizationResult:
    started = time.perf_counter()
    unsupported = [k for k in ("layer_types", "min_params", "observer_type") if k in kwargs]
    if kwargs.get("per_channel", True) is not True:  # tensors are always quantized per channel here
        unsupported.append("per_channel")
    plan = _make_plan(
        bits,
        scheme,
        kwargs.get("group_size", 128),
        dynamic,
        bool(kwargs.get("weight_only", False)),
        kwargs.get("embedding_bits", 8),
        kwargs.get("clip_search_steps", DEFAULT_CLIP_SEARCH_STEPS),
        kwargs.get("dtype"),
        kwargs.get("include"),
        kwargs.get("exclude"),
    )
    progress = Progress(show_progress, kwargs.get("progress_callback"))
    tensors, layers = quantize_state_dict(state_dict, plan, progress, device=kwargs.get("_device"))
    info = QuantizationInfo(
        selected_layers=list(layers),
        skipped_layers=list(plan.skipped),
        skip_reasons=dict(plan.skipped),
        dtype=_dtype_for(bits, kwargs),
        symmetric=plan.symmetric,
        mode="state_dict_"
        + ("cast" if bits == 16 else plan.activation if plan.activation != "none" else "weight_only"),
        group_size=plan.group_size if bits == 4 else None,
        layer_configs=layers,
        original_size_bytes=sum(t.numel() * t.element_size() for t in state_dict.values()),
        quantized_size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        duration_s=time.perf_counter() - started,
    )
    if unsupported:
        info.warnings.append(f"options {unsupported} need module types and were not applied to a state_dict")
    if not layers:
        info.warnings.append("no tensor was quantized: no floating '*.weight' of 2+ dimensions matched")
    return QuantizationResult(
        model=tensors, info=info, warnings=list(info.warnings), original=state_dict, layers=layers
    )
