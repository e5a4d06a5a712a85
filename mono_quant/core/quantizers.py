"""Model-level quantization: pick layers, (calibrate,) build quantized layers, swap them in.

The caller's model is never modified, and never copied whole either: the new model shares
nothing with the old one but is built so that only what stays float is copied, and each
quantized layer is made straight from the original float weight. The extra peak memory of
quantizing is therefore about the size of the result.

Two entry points, plus the dataclass that describes what happened:

* :func:`dynamic_quantize` - no data needed: int8 weights with per-token int8 activations
  (``weight_only=False``), int8 / int4 weight-only, or an fp16 / bf16 cast.
* :func:`static_quantize` - calibration data through observers gives each layer fixed
  activation qparams; int8 weights and int8 activations.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mono_quant.core.calibration import count_batches, iter_calibration_batches, run_batch
from mono_quant.core.config import QuantizationConfig, resolve_dtype
from mono_quant.core.observers import OBSERVERS, create_observer
from mono_quant.core.progress import Progress, ProgressCallback
from mono_quant.core.schemes import DEFAULT_CLIP_SEARCH_STEPS, INT8_ASYMMETRIC, INT8_SYMMETRIC
from mono_quant.core.selection import LayerSelection, SkippedLayer, select_layers
from mono_quant.errors import ConfigurationError, InputError, MonoQuantError, QuantizationError
from mono_quant.modules import LayerQuantConfig, quantized_class_for

__all__ = [
    "QuantizationInfo",
    "dynamic_quantize",
    "static_quantize",
    "quantize_layers",
    "model_size_bytes",
    "cast_hooks",
]


@dataclass
class QuantizationInfo:
    """What a quantization run did. The first five fields are the classic ones.

    Example:
        >>> QuantizationInfo(selected_layers=["fc"], skipped_layers=[],
        ...                  calibration_samples_used=0, dtype=torch.qint8, symmetric=True).bits
        8
    """

    selected_layers: list[str] = field(default_factory=list)
    skipped_layers: list[str] = field(default_factory=list)
    calibration_samples_used: int = 0
    dtype: Any = torch.qint8
    symmetric: bool = True
    warnings: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)
    layer_configs: dict[str, dict] = field(default_factory=dict)
    mode: str = "dynamic"
    per_channel: bool = True
    group_size: int | None = None
    observer_type: str | None = None
    original_size_bytes: int | None = None
    quantized_size_bytes: int | None = None
    duration_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int | None:
        """4, 8 or 16 for the dtypes mono_quant produces; None for other (informational) dtypes,
        such as the ``torch.int32`` some callers of the classic constructor pass."""
        try:
            return resolve_dtype(self.dtype)[0]
        except ConfigurationError:
            return None

    @property
    def compression_ratio(self) -> float | None:
        if self.original_size_bytes and self.quantized_size_bytes:
            return self.original_size_bytes / self.quantized_size_bytes
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dtypes become strings."""
        data = asdict(self)
        data["dtype"] = str(self.dtype).replace("torch.", "")
        data["bits"] = self.bits
        data["compression_ratio"] = self.compression_ratio
        return data


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once), and of the weights a
    quantized layer holds in a kernel's own packed form."""
    seen: set[int] = set()
    total = 0
    kernel = [t for m in model.modules() if hasattr(m, "kernel_tensors") for t in m.kernel_tensors()]
    for tensor in list(model.parameters()) + list(model.buffers()) + kernel:
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


# -- fp16 / bf16 casts ---------------------------------------------------------------------------
def _first_float_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, nn.utils.rnn.PackedSequence):
        value = value.data
    if isinstance(value, torch.Tensor):
        return value.dtype if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        return next((d for d in map(_first_float_dtype, value) if d is not None), None)
    return None


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating-point tensors cast to ``dtype``, also inside tuples and lists
    (an LSTM takes ``(h0, c0)`` and returns ``(output, (h, c))``) and packed sequences."""
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return value.to(dtype) if value.data.is_floating_point() else value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _cast_input_hook(module: nn.Module, args: tuple) -> tuple:
    # Not module.weight: an LSTM's parameters are weight_ih_l0, ...
    dtype = next(module.parameters()).dtype
    object.__setattr__(module, "_mono_quant_io_dtype", _first_float_dtype(args))
    return _cast_floats(args, dtype)


def _cast_output_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    io_dtype = getattr(module, "_mono_quant_io_dtype", None)
    return output if io_dtype is None else _cast_floats(output, io_dtype)


def cast_hooks(module: nn.Module) -> None:
    """Make a layer cast to fp16/bf16 accept and return its neighbours' dtype."""
    module.register_forward_pre_hook(_cast_input_hook)
    module.register_forward_hook(_cast_output_hook)


# -- building the new model ----------------------------------------------------------------------
def _copy_except(model: nn.Module, replacements: dict[int, torch.Tensor]) -> nn.Module:
    """``deepcopy(model)`` where tensors whose id is in ``replacements`` become the given
    tensor instead of being copied (so big float weights are never duplicated)."""
    memo: dict[int, Any] = dict(replacements)
    return copy.deepcopy(model, memo)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _layer_config(
    module: nn.Module,
    bits: int,
    symmetric: bool,
    per_channel: bool,
    group_size: int | None,
    activation: str,
    activation_symmetric: bool,
    embedding_bits: int,
    warnings: list[str],
    name: str,
    clip_search_steps: int = 0,
) -> LayerQuantConfig:
    is_linear = isinstance(module, nn.Linear)
    if isinstance(module, nn.Embedding):
        bits = embedding_bits
        activation = "none"
    elif not is_linear:
        if bits == 4:
            warnings.append(f"{name}: int4 is not available for {type(module).__name__}; stored int8 per channel")
            bits = 8
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or activation == "dynamic":
            activation = "none"
    # group_size is for int4; int8 is per output channel (or per tensor), which is what the
    # _int_mm kernels take.
    return LayerQuantConfig(
        bits=bits,
        symmetric=symmetric,
        group_size=(group_size or 128) if bits == 4 else None,
        activation=activation,
        activation_symmetric=activation_symmetric,
        per_channel=per_channel or bits == 4,
        clip_search_steps=clip_search_steps if bits == 4 else 0,
    )


def quantize_layers(
    model: nn.Module,
    *,
    bits: int,
    float_dtype: torch.dtype | None = None,
    symmetric: bool = True,
    per_channel: bool = True,
    group_size: int | None = None,
    activation: str = "none",
    activation_symmetric: bool = False,
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    selection: LayerSelection | None = None,
    embedding_bits: int = 8,
    clip_search_steps: int = DEFAULT_CLIP_SEARCH_STEPS,
    progress: Progress | None = None,
    info: QuantizationInfo | None = None,
) -> tuple[nn.Module, QuantizationInfo]:
    """The shared core of both quantizers: a new model with the selected layers replaced.

    ``input_qparams`` (static mode) maps layer names to calibrated activation qparams;
    selected layers without an entry fall back to weight-only with a warning.
    """
    started = time.perf_counter()
    selection = selection or LayerSelection()
    progress = progress or Progress()
    info = info or QuantizationInfo()
    selected, skipped = select_layers(model, selection)

    new_layers: dict[str, nn.Module] = {}
    placeholders: dict[int, torch.Tensor] = {}
    for name, module in progress.track(selected, "quantize", total=len(selected)):
        try:
            if bits == 16:
                new_layers[name] = module
                for tensor in module.parameters(recurse=False):
                    placeholders[id(tensor)] = nn.Parameter(
                        tensor.detach().to(float_dtype), requires_grad=tensor.requires_grad
                    )
                info.layer_configs[name] = {"kind": "cast", "dtype": str(float_dtype).replace("torch.", "")}
                continue
            if quantized_class_for(module) is None:
                raise QuantizationError(f"no quantized layer for {type(module).__name__}")
            layer_activation = activation
            qparams = None
            if activation == "static" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                qparams = (input_qparams or {}).get(name)
                if qparams is None:
                    info.warnings.append(f"{name}: saw no calibration data; quantized weight-only")
                    layer_activation = "none"
            config = _layer_config(
                module,
                bits,
                symmetric,
                per_channel,
                group_size,
                layer_activation,
                activation_symmetric,
                embedding_bits,
                info.warnings,
                name,
                clip_search_steps,
            )
            if isinstance(module, nn.Linear) and config.group_size and module.in_features % config.group_size:
                skipped.append(
                    SkippedLayer(
                        name,
                        "linear",
                        f"in_features={module.in_features} is not divisible by group_size={config.group_size}",
                    )
                )
                continue
            cls = quantized_class_for(module)
            extra = {"input_qparams": qparams} if config.activation == "static" else {}
            new_layers[name] = cls.from_float(module, config, **extra)
            info.layer_configs[name] = new_layers[name].metadata()
            for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                placeholders[id(tensor)] = torch.empty(0, device="meta")
        except MonoQuantError as exc:
            skipped.append(SkippedLayer(name, type(module).__name__.lower(), exc.message))

    try:
        quantized = _copy_except(model, placeholders)
    except Exception as exc:  # deepcopy of user modules can fail in many ways
        raise QuantizationError(
            f"could not copy the model ({type(exc).__name__}: {exc})",
            suggestion="Make sure the model can be deep-copied (no open files or locks held "
            "as attributes), or pass a state_dict instead.",
        ) from exc
    for name, layer in new_layers.items():
        if bits == 16:
            cast_hooks(quantized.get_submodule(name))
        elif name:
            _set_submodule(quantized, name, layer)
        else:  # the model is itself one layer (a bare nn.Linear, nn.LSTM...)
            quantized = layer
    quantized.eval()

    info.selected_layers = [name for name in new_layers]
    info.skipped_layers = [s.name for s in skipped]
    info.skip_reasons = {s.name: s.reason for s in skipped}
    info.symmetric = symmetric
    info.per_channel = per_channel
    info.group_size = group_size if bits == 4 else info.group_size
    info.original_size_bytes = model_size_bytes(model)
    info.quantized_size_bytes = model_size_bytes(quantized)
    info.duration_s = time.perf_counter() - started
    if not new_layers:
        info.warnings.append("no layer was quantized: check layer_types, include and exclude")
    return quantized, info


def _resolve(config: QuantizationConfig | None, **given: Any) -> QuantizationConfig:
    if config is None:
        return QuantizationConfig(**{k: v for k, v in given.items() if v is not None})
    if not isinstance(config, QuantizationConfig):
        raise ConfigurationError(
            f"config must be a QuantizationConfig, got {type(config).__name__}",
            suggestion="Build one with mono_quant.QuantizationConfig(dtype=..., symmetric=...).",
        )
    return config


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            suggestion="Pass the model object; mono_quant.quantize() also takes state_dicts and file paths.",
        )
    return model


def dynamic_quantize(
    model: nn.Module,
    dtype: Any = torch.qint8,
    symmetric: bool | None = None,
    per_channel: bool | None = None,
    group_size: int | None = None,
    *,
    config: QuantizationConfig | None = None,
    weight_only: bool = False,
    layer_types: Any = None,
    include: Any = None,
    exclude: Any = None,
    min_params: int = 0,
    embedding_bits: int = 8,
    clip_search_steps: int = DEFAULT_CLIP_SEARCH_STEPS,
    show_progress: bool = False,
    progress_callback: ProgressCallback | None = None,
    return_info: bool = False,
) -> tuple[nn.Module, Any]:
    """Quantize without data. Returns ``(model, skipped_layer_names)``
    (or ``(model, QuantizationInfo)`` with ``return_info=True``).

    * int8, ``weight_only=False``: int8 weights per channel, activations quantized per token
      at run time (``torch._int_mm``).
    * int8, ``weight_only=True``: int8 weights, float-precision activations (most accurate).
    * int4 (``torch.quint4x2`` / ``"int4"``): group-wise weights (``group_size``, 128 by
      default), always weight-only; embeddings int8 (``embedding_bits``). Each group's range
      comes from an MSE clipping search over ``clip_search_steps`` candidates (0 = min/max).
    * float16 / bfloat16: selected layers cast, their inputs and outputs cast back.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> qmodel, skipped = dynamic_quantize(mlp, dtype=torch.qint8)
        >>> type(qmodel[0]).__name__, skipped
        ('QuantizedLinear', [])
    """
    _check_model(model)
    cfg = _resolve(config, dtype=dtype, symmetric=symmetric, per_channel=per_channel, group_size=group_size)
    bits = cfg.bits
    selection = LayerSelection(layer_types=layer_types, include=include, exclude=exclude, min_params=min_params)
    info = QuantizationInfo(dtype=cfg.dtype, mode="weight_only" if weight_only or bits == 4 else "dynamic")
    if bits == 16:
        info.mode = "cast"
    activation = "none" if weight_only or bits in (4, 16) else "dynamic"
    quantized, info = quantize_layers(
        model,
        bits=bits,
        float_dtype=cfg.float_dtype,
        symmetric=cfg.symmetric,
        per_channel=cfg.per_channel,
        group_size=cfg.group_size,
        activation=activation,
        selection=selection,
        embedding_bits=embedding_bits,
        clip_search_steps=clip_search_steps,
        progress=Progress(show_progress, progress_callback),
        info=info,
    )
    return quantized, (info if return_info else info.skipped_layers)


@torch.inference_mode()
def _calibrate(
    model: nn.Module,
    calibration_data: Any,
    layer_names: list[str],
    observer_type: str,
    max_samples: int,
    progress: Progress,
    batch_size: int,
) -> tuple[dict[str, Any], int]:
    observers = {name: create_observer(observer_type) for name in layer_names}
    handles = []

    def make_hook(observer):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                observer.observe(args[0])

        return hook

    # Each module's own flag: a model in training mode may hold frozen (eval) parts.
    training_flags = [(module, module.training) for module in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    samples = 0
    try:
        for name in layer_names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(observers[name])))
        model.eval()
        batches = iter_calibration_batches(calibration_data, max_samples, batch_size)
        total = count_batches(calibration_data, max_samples, batch_size)
        for batch, size in progress.track(batches, "calibrate", total=total):
            try:
                run_batch(model, batch, device)
            except MonoQuantError:
                raise
            except Exception as exc:
                raise InputError(
                    f"the model failed on a calibration batch: {type(exc).__name__}: {exc}",
                    suggestion="Calibration batches must be valid model inputs: a tensor is "
                    "passed as model(x), a tuple as model(*batch), a dict as model(**batch).",
                ) from exc
            samples += size
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags:
            module.training = flag
    return observers, samples


def static_quantize(
    model: nn.Module,
    calibration_data: Any,
    dtype: Any = torch.qint8,
    symmetric: bool | None = None,
    per_channel: bool | None = None,
    observer_type: str | None = None,
    num_calibration_samples: int | None = None,
    *,
    config: QuantizationConfig | None = None,
    activation_symmetric: bool | None = None,
    layer_types: Any = None,
    include: Any = None,
    exclude: Any = None,
    min_params: int = 0,
    calibration_batch_size: int = 32,
    show_progress: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> tuple[nn.Module, QuantizationInfo]:
    """Calibrate activation ranges on ``calibration_data``, then quantize weights and
    activations to int8. Returns ``(model, QuantizationInfo)``.

    Activation qparams are per tensor, chosen by ``observer_type`` ("minmax",
    "moving_average", "histogram"), asymmetric unless ``activation_symmetric=True``; they are
    fixed at inference and used: each Linear/Conv input is quantized to int8 with them.
    Calibration runs the original model under ``torch.inference_mode()`` with temporary hooks
    and leaves it as it was.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> qmodel, info = static_quantize(mlp, torch.randn(64, 16))
        >>> info.calibration_samples_used
        64
    """
    _check_model(model)
    cfg = _resolve(
        config,
        dtype=dtype,
        symmetric=symmetric,
        per_channel=per_channel,
        observer_type=observer_type,
        num_calibration_samples=num_calibration_samples,
        activation_symmetric=activation_symmetric,
    )
    if cfg.observer_type not in OBSERVERS:
        create_observer(cfg.observer_type)  # raises ConfigurationError listing valid names
    if cfg.bits != 8:
        raise ConfigurationError(
            f"static quantization quantizes activations to int8 and needs int8 weights, got {cfg.dtype}",
            suggestion="Use dtype=torch.qint8, or dynamic_quantize for int4 / fp16 / bf16.",
        )
    progress = Progress(show_progress, progress_callback)
    selection = LayerSelection(layer_types=layer_types, include=include, exclude=exclude, min_params=min_params)
    selected, _ = select_layers(model, selection)
    calibrated = [n for n, m in selected if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    observers, samples = _calibrate(
        model,
        calibration_data,
        calibrated,
        cfg.observer_type,
        cfg.num_calibration_samples,
        progress,
        calibration_batch_size,
    )
    act_spec = INT8_SYMMETRIC if cfg.activation_symmetric else INT8_ASYMMETRIC
    input_qparams = {name: obs.calculate_qparams(act_spec) for name, obs in observers.items() if obs.batches_seen}
    info = QuantizationInfo(
        dtype=cfg.dtype, mode="static", observer_type=cfg.observer_type, calibration_samples_used=samples
    )
    return quantize_layers(
        model,
        bits=8,
        symmetric=cfg.symmetric,
        per_channel=cfg.per_channel,
        activation="static",
        activation_symmetric=cfg.activation_symmetric,
        input_qparams=input_qparams,
        selection=selection,
        progress=progress,
        info=info,
    )
