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
import dataclasses
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mono_quant.core.algorithms.hqq import hqq_quantize_weight
from mono_quant.core.calibration import ObservedForward, count_batches, iter_calibration_batches
from mono_quant.core.config import QuantizationConfig, resolve_dtype
from mono_quant.core.observers import OBSERVERS, create_observer
from mono_quant.core.options import QuantizeOptions
from mono_quant.core.plan import LayerQuantConfig, QuantizationPlan, plan_module
from mono_quant.core.progress import Progress, ProgressCallback
from mono_quant.core.schemes import INT8_ASYMMETRIC, INT8_SYMMETRIC
from mono_quant.core.scratch import reused_scratch
from mono_quant.errors import ConfigurationError, InputError, MonoQuantError, QuantizationError
from mono_quant.modules import packed_together, quantize_weight_tensors, quantized_class_for, stored_weight_tensors

__all__ = [
    "QuantizationInfo",
    "dynamic_quantize",
    "static_quantize",
    "quantize_layers",
    "quantize_planned",
    "options_from_config",
    "weight_tensors_for",
    "mode_name",
    "model_size_bytes",
    "cast_hooks",
    "is_cast_layer",
    "set_submodule",
    "build_layer",
    "PreparedRun",
    "prepare_run",
    "build_run",
    "statistics_batches",
    "statistics_source",
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
    # {layer pattern: precision}: the run's own layer_overrides, or what the accuracy-target
    # search chose (reusable as quantize(..., layer_overrides=...))
    layer_overrides: dict[str, str] = field(default_factory=dict)

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
    total = sum(m.kernel_nbytes() for m in model.modules() if hasattr(m, "kernel_nbytes"))
    for tensor in list(model.parameters()) + list(model.buffers()):
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


def is_cast_layer(module: nn.Module) -> bool:
    """Whether ``module`` was cast to fp16 / bf16 by :func:`cast_hooks`."""
    return any(hook is _cast_input_hook for hook in module._forward_pre_hooks.values())


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


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# HQQ given each input feature's importance: the (min, max) range search and the scale refit
# with the zero point (measured on MiniLM int4 g128 from random-token statistics: 0.9777; the
# zero-point-only refit of upstream, unweighted: 0.9610). See core/algorithms/hqq.py.
_WEIGHTED_HQQ = {"refine_scale": True, "range_search_steps": 7}


def weight_tensors_for(
    weight: torch.Tensor, config: LayerQuantConfig, column_weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A weight in the stored layout, rounded by ``config.method``'s algorithm without a
    Hessian: round-to-nearest (with the clip search), or HQQ, weighted by ``column_weights``
    (each input feature's mean square, when the run measured them). GPTQ's tensors come from
    :func:`build_run`."""
    if config.method == "hqq":
        extra = _WEIGHTED_HQQ if column_weights is not None else {}
        qt = hqq_quantize_weight(
            weight.detach(),
            config.weight_spec,
            config.group_size,
            init_clip_search_steps=config.clip_search_steps,
            column_weights=column_weights,
            **extra,
        )
        return stored_weight_tensors(qt, config)
    return quantize_weight_tensors(weight, config)


def _cache_key(name: str, config: LayerQuantConfig) -> tuple:
    return (name, *config.weight_key())


def build_layer(
    module: nn.Module,
    config: LayerQuantConfig,
    *,
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    weight_tensors: dict[str, torch.Tensor] | None = None,
    input_smoothing: torch.Tensor | None = None,
    column_weights: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, str | None]:
    """The quantized form of one float layer: ``(layer, its weight tensors, note)``.

    A static layer without calibrated ``input_qparams`` becomes weight-only (the note says
    so). A Linear whose weight was smoothed (``input_smoothing``, the SmoothQuant scale the
    working copy divides its input by) divides its own input, whatever its activation mode.
    ``column_weights``: the input features' mean squares HQQ weighs its rounding by.
    Raises QuantizationError for a module no quantized layer takes."""
    cls = quantized_class_for(module)
    if cls is None:
        raise QuantizationError(f"no quantized layer for {type(module).__name__}")
    extra: dict[str, Any] = {}
    note = None
    if config.activation == "static":
        if input_qparams is None:
            note = "saw no calibration data; quantized weight-only"
            config = dataclasses.replace(config, activation="none")
        else:
            extra["input_qparams"] = input_qparams
    tensors = None
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if weight_tensors is None:
            weight_tensors = weight_tensors_for(module.weight, config, column_weights)
        tensors = weight_tensors
        extra["weight_tensors"] = tensors
    if input_smoothing is not None and isinstance(module, nn.Linear):
        config = dataclasses.replace(config, smoothed_input=True)
        extra["input_smoothing"] = input_smoothing
    return cls.from_float(module, config, **extra), tensors, note


def _tensor_users(model: nn.Module) -> dict[int, set[str]]:
    """``id(tensor) -> names of the modules holding it directly`` (a tied weight has several)."""
    users: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            users.setdefault(id(tensor), set()).add(name)
    return users


def quantize_layers(
    model: nn.Module,
    plan: QuantizationPlan,
    *,
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    weight_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    input_smoothing: dict[str, torch.Tensor] | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
    info: QuantizationInfo | None = None,
    weight_cache: dict | None = None,
) -> tuple[nn.Module, QuantizationInfo]:
    """A new model with the layers ``plan`` changes replaced; the shared core of every mode.

    ``input_qparams`` (static mode) maps layer names to calibrated activation qparams; a static
    layer without an entry falls back to weight-only with a warning. ``weight_tensors`` maps
    layer names to weights already in the stored layout (chosen by GPTQ), ``column_weights``
    to the input statistics HQQ weighs each layer's rounding by. A tie group
    whose members get the same weight config is quantized once and its tensors shared.
    ``weight_cache`` (the accuracy-target search's, across trials) keeps the HQQ / GPTQ tensors
    of each (layer, weight config), so a trial recomputes only the layers whose config changed.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    info = info or QuantizationInfo()
    weight_tensors = weight_tensors or {}
    decisions = [d for d in plan.layers.values() if d.changes]
    skipped = dict(plan.skipped)
    warnings = list(plan.notes)

    new_layers: dict[str, nn.Module] = {}
    stored: dict[str, dict[str, torch.Tensor]] = {}  # tensors of each quantized layer, for ties
    replacements: dict[int, torch.Tensor] = {}
    # block buffers fault in once per run, not once per layer; int8 layers pack together
    with reused_scratch(), packed_together():
        for decision in progress.track(decisions, "quantize", total=len(decisions)):
            name = decision.name
            module = model.get_submodule(name)
            try:
                if decision.cast is not None:
                    new_layers[name] = module
                    for tensor in module.parameters(recurse=False):
                        replacements[id(tensor)] = nn.Parameter(
                            tensor.detach().to(decision.cast), requires_grad=tensor.requires_grad
                        )
                    info.layer_configs[name] = decision.metadata()
                    continue
                shared = plan.shared_with(name)
                tensors = weight_tensors.get(name)
                if tensors is None and shared in stored:
                    tensors = stored[shared]
                if tensors is None and weight_cache is not None:
                    tensors = weight_cache.get(_cache_key(name, decision.config))
                layer, tensors, note = build_layer(
                    module,
                    decision.config,
                    input_qparams=(input_qparams or {}).get(name),
                    weight_tensors=tensors,
                    input_smoothing=(input_smoothing or {}).get(name),
                    column_weights=(column_weights or {}).get(name),
                )
                if note:
                    warnings.append(f"{name}: {note}")
                if tensors is not None:
                    if decision.tie is not None:  # kept only for a tie to reuse: peak memory
                        stored[name] = tensors
                    if weight_cache is not None and decision.config.method != "rtn":
                        weight_cache[_cache_key(name, decision.config)] = tensors
                if shared in stored:
                    layer.tied_to = shared
                new_layers[name] = layer
                info.layer_configs[name] = layer.metadata()
            except MonoQuantError as exc:
                skipped[name] = exc.message
                warnings.append(f"{name}: not quantized: {exc.message}")

    # Tensors of replaced layers are not copied into the new model, unless a layer that stays
    # (the float side of a tie) still holds them.
    users = _tensor_users(model)
    replaced = set(new_layers)
    for name in new_layers:
        if name in info.layer_configs and info.layer_configs[name].get("kind") == "cast":
            continue
        module = model.get_submodule(name)
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if users.get(id(tensor), set()) <= replaced:
                replacements[id(tensor)] = torch.empty(0, device="meta")
    try:
        quantized = _copy_except(model, replacements)
    except Exception as exc:  # deepcopy of user modules can fail in many ways
        raise QuantizationError(
            f"could not copy the model ({type(exc).__name__}: {exc})",
            suggestion="Make sure the model can be deep-copied (no open files or locks held "
            "as attributes), or pass a state_dict instead.",
        ) from exc
    for name, layer in new_layers.items():
        if info.layer_configs[name].get("kind") == "cast":
            cast_hooks(quantized.get_submodule(name))
        elif name:
            set_submodule(quantized, name, layer)
        else:  # the model is itself one layer (a bare nn.Linear, nn.LSTM...)
            quantized = layer
    quantized.eval()

    options = plan.options
    info.selected_layers = list(new_layers)
    info.skipped_layers = list(skipped)
    info.skip_reasons = skipped
    info.warnings.extend(warnings)
    info.symmetric = options.symmetric
    info.per_channel = options.effective_per_channel
    info.group_size = options.effective_group_size if options.bits == 4 else None
    info.original_size_bytes = model_size_bytes(model)
    info.quantized_size_bytes = model_size_bytes(quantized)
    info.duration_s = time.perf_counter() - started
    if not new_layers:
        info.warnings.append("no layer was quantized: check layer_types, include and exclude")
    return quantized, info


def options_from_config(config: QuantizationConfig | None, static: bool = False, **given: Any) -> QuantizeOptions:
    """:class:`QuantizeOptions` from the classic ``QuantizationConfig`` / keyword style of
    :func:`dynamic_quantize` and :func:`static_quantize` (``dtype``, ``symmetric``...)."""
    cfg = _resolve(config, **{k: given.pop(k) for k in list(given) if k in _CONFIG_KEYS})
    bits = cfg.bits
    if static and bits != 8:
        raise ConfigurationError(
            f"static quantization quantizes activations to int8 and needs int8 weights, got {cfg.dtype}",
            suggestion="Use dtype=torch.qint8, or dynamic_quantize for int4 / fp16 / bf16.",
        )
    kwargs: dict[str, Any] = {"bits": bits, "scheme": "symmetric" if cfg.symmetric else "asymmetric"}
    if bits == 16:
        kwargs["dtype"] = str(cfg.float_dtype).replace("torch.", "")
    if bits == 8:
        kwargs["per_channel"] = cfg.per_channel
    if bits == 4:
        kwargs["group_size"] = cfg.group_size
    if static:
        kwargs["observer_type"] = cfg.observer_type
        kwargs["num_calibration_samples"] = cfg.num_calibration_samples
        kwargs["dynamic"] = False
    kwargs.update({k: v for k, v in given.items() if v is not None})
    return QuantizeOptions.from_kwargs(**kwargs)


_CONFIG_KEYS = ("dtype", "symmetric", "per_channel", "group_size", "observer_type", "num_calibration_samples")


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
    embedding_bits: int | None = None,
    clip_search_steps: int | None = None,
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
    options = options_from_config(
        config,
        dtype=dtype,
        symmetric=symmetric,
        per_channel=per_channel,
        group_size=group_size,
        weight_only=weight_only or None,
        dynamic=None,
        layer_types=layer_types,
        include=include,
        exclude=exclude,
        min_params=min_params or None,
        embedding_bits=embedding_bits,
        clip_search_steps=clip_search_steps,
        progress_callback=progress_callback,
    )
    if options.bits == 8 and not options.weight_only:
        options = dataclasses.replace(options, dynamic=True)
    quantized, info = quantize_planned(model, options, show_progress=show_progress)
    return quantized, (info if return_info else info.skipped_layers)


def quantize_planned(
    model: nn.Module,
    options: QuantizeOptions,
    calibration_data: Any = None,
    *,
    show_progress: bool = False,
    eval_data: Any = None,
) -> tuple[nn.Module, QuantizationInfo]:
    """Plan, (calibrate,) and quantize ``model`` with ``options``: what ``quantize()`` runs
    for modules. With ``max_accuracy_loss`` the accuracy-target search (``core/tuning``)
    runs instead, on ``eval_data`` (default: a held-out part of ``calibration_data``).
    Returns ``(quantized model, QuantizationInfo)``."""
    progress = Progress(show_progress, options.progress_callback)
    batches = None
    if calibration_data is not None:
        batches = [
            batch
            for batch, _ in iter_calibration_batches(
                calibration_data, options.effective_calibration_samples, options.effective_calibration_batch_size
            )
        ]
    original, rotation = model, None
    if options.rotation:
        # every later step (plan, statistics, calibration, the target search) runs on the
        # rotated copy as if the caller had given it: same function, other basis, untied head
        model, rotation = _rotated_copy(model)
    if options.max_accuracy_loss is not None:
        from mono_quant.core.tuning import quantize_to_target

        quantized, info = quantize_to_target(model, options, batches, eval_data, progress)
    else:
        statistics = statistics_batches(model, options, batches)
        plan = plan_module(model, options, statistics=statistics_source(statistics, batches))
        prepared = prepare_run(model, plan, batches, progress, statistics)
        quantized, info = build_run(prepared, plan, progress)
    if rotation is not None:
        info.original_size_bytes = model_size_bytes(original)  # the caller's model (its tie included)
        info.metrics["rotation"] = rotation
        if rotation["untied_output_head"]:
            info.warnings.append(
                "rotation untied the output head from the token embedding (they now differ): "
                f"{rotation['untied_output_head']:,} more weights stored"
            )
    return quantized, info


def _rotated_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """``rotation=True``: a working copy of ``model`` with its residual stream rotated
    (``algorithms.rotation``), and what the run's info records of it."""
    from mono_quant.core.algorithms import ROTATION_SEED, rotate_residual_stream, tied_output_head

    tied = tied_output_head(model)
    with torch.inference_mode(False), torch.no_grad():
        work = copy.deepcopy(model)
        rotate_residual_stream(work, ROTATION_SEED)
    return work, {
        "kind": "random orthogonal",
        "seed": ROTATION_SEED,
        "untied_output_head": 0 if tied is None else tied.weight.numel(),
    }


def statistics_source(statistics: list | None, batches: list | None) -> str | None:
    """What :func:`statistics_batches` returned, in words: "calibration data", "random tokens" or None."""
    if statistics is None:
        return None
    return "calibration data" if statistics is batches else "random tokens"


def statistics_batches(model: nn.Module, options: QuantizeOptions, batches: list | None) -> list | None:
    """What this run measures input statistics on (SmoothQuant's activation maxima, the input
    mean squares weighted HQQ rounds by): the calibration batches; without them, for a model
    with a token embedding, random token ids (``algorithms.synthetic_token_batches``:
    per-channel statistics of a transformer come mostly from its weights, not its text); else
    None. Raises ConfigurationError for ``smoothing`` asked for with nothing to measure on."""
    from mono_quant.core.algorithms import synthetic_token_batches

    if batches is not None:
        return batches
    wanted = options.effective_smoothing(True) is not None or options.uses_importance()
    if not wanted:
        return None
    try:
        return synthetic_token_batches(model)
    except InputError:  # no token embedding
        if options.smoothing:
            raise ConfigurationError(
                f"smoothing={options.smoothing} needs activations to measure, and there is no calibration data "
                f"and no token embedding ({type(model).__name__}) to draw random tokens from",
                suggestion="Give calibration_data (a few batches of real inputs), or drop smoothing.",
            ) from None
        return None


@dataclass
class PreparedRun:
    """What a run computes from its data once, whatever each layer's precision ends up being:
    the model to quantize from (the caller's, or a smoothed working copy), the calibration
    batches, SmoothQuant's input scales, static activation qparams, HQQ's input statistics,
    and the info so far."""

    model: nn.Module
    source: nn.Module
    batches: list | None
    input_smoothing: dict[str, torch.Tensor]
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    info: QuantizationInfo
    column_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_run(
    model: nn.Module,
    plan: QuantizationPlan,
    batches: list | None,
    progress: Progress,
    statistics: list | None = None,
) -> PreparedRun:
    """Smoothing, HQQ's input statistics and static calibration for ``plan`` (see
    :func:`build_run`). ``batches``: the calibration data; ``statistics``: what activations
    are measured on (:func:`statistics_batches`: the calibration data, the default, or random
    tokens)."""
    options = plan.options
    statistics = batches if statistics is None else statistics
    info = QuantizationInfo(dtype=options.quantized_dtype, mode=mode_name(options))
    if statistics is not None:
        info.metrics["statistics"] = {"source": statistics_source(statistics, batches), "batches": len(statistics)}
    source, input_smoothing, column_weights = model, {}, {}
    alpha = options.effective_smoothing(statistics is not None)
    try:
        if alpha is not None:
            per_group = options.smoothing_per_group(batches is not None)
            source, input_smoothing = _smooth(model, plan, statistics, alpha, info, per_group)
        if statistics is not None:
            column_weights = _input_importance(source, plan, statistics, info)
    except (RuntimeError, ValueError, TypeError, IndexError, MonoQuantError) as exc:
        if statistics is batches:
            raise
        # random tokens are a guess at what the model takes (input_ids, attention_mask): a model
        # that needs more (an encoder-decoder's decoder inputs) runs without the statistics
        if options.smoothing:
            raise ConfigurationError(
                f"smoothing={options.smoothing} needs activations, and the model did not run on random token ids "
                f"({type(exc).__name__}: {exc})",
                suggestion="Give calibration_data in the form the model's forward takes, or drop smoothing.",
            ) from exc
        info.warnings.append(
            f"the model did not run on random token ids ({type(exc).__name__}: {exc}): quantized without "
            "data-free statistics (no smoothing, unweighted HQQ); give calibration_data to use them"
        )
        info.metrics.pop("statistics", None)
        info.metrics.pop("smoothing", None)
        source, input_smoothing, column_weights = model, {}, {}
    input_qparams = None
    if options.is_static:
        if options.effective_observer not in OBSERVERS:
            create_observer(options.effective_observer)  # raises ConfigurationError listing valid names
        calibrated = [d.name for d in plan.layers.values() if d.config is not None and d.config.activation == "static"]
        observers, samples = _calibrate(
            source,
            batches,
            calibrated,
            options.effective_observer,
            options.effective_calibration_samples,
            progress,
            options.effective_calibration_batch_size,
        )
        spec = INT8_SYMMETRIC if options.activation_symmetric else INT8_ASYMMETRIC
        input_qparams = {name: obs.calculate_qparams(spec) for name, obs in observers.items() if obs.batches_seen}
        info.observer_type = options.effective_observer
        info.calibration_samples_used = samples
    return PreparedRun(model, source, batches, input_smoothing, input_qparams, info, column_weights)


def build_run(
    prepared: PreparedRun, plan: QuantizationPlan, progress: Progress, weight_cache: dict | None = None
) -> tuple[nn.Module, QuantizationInfo]:
    """The quantized model of ``plan`` from a prepared run (GPTQ's rounding, then the layers).
    ``plan`` may differ from the one the run was prepared with in its layers' precisions
    (the accuracy-target search's trials); each call starts from a copy of the prepared info."""
    info = dataclasses.replace(
        prepared.info,
        warnings=list(prepared.info.warnings),
        metrics=dict(prepared.info.metrics),
        layer_configs={},
        layer_overrides=dict(plan.options.layer_overrides or ()),
    )
    weight_tensors = None
    if any(d.config is not None and d.config.method == "gptq" for d in plan.layers.values()):
        weight_tensors = _gptq(prepared.source, plan, prepared.batches, progress, info, weight_cache)
    quantized, info = quantize_layers(
        prepared.source,
        plan,
        input_qparams=prepared.input_qparams,
        weight_tensors=weight_tensors,
        input_smoothing=prepared.input_smoothing,
        column_weights=prepared.column_weights,
        progress=progress,
        info=info,
        weight_cache=weight_cache,
    )
    if prepared.source is not prepared.model:  # sizes of the caller's model, not of the smoothed working copy
        info.original_size_bytes = model_size_bytes(prepared.model)
    return quantized, info


def _input_importance(model, plan, batches, info) -> dict[str, torch.Tensor]:
    """``{name: mean square of each input feature}`` of the Linears HQQ rounds, measured on
    ``batches``; a Linear that never ran gets none (unweighted HQQ), with a note."""
    from mono_quant.core.algorithms import collect_input_mean_squares

    names = [d.name for d in plan.layers.values() if d.config is not None and d.config.method == "hqq"]
    if not names:
        return {}
    with torch.inference_mode(False), torch.no_grad():
        importance = collect_input_mean_squares(model, batches, names, strict=False)
    unseen = [name for name in names if name not in importance]
    if unseen:
        info.warnings.append(
            f"{len(unseen)} Linear(s) never ran on the statistics inputs (e.g. {unseen[0]!r}): HQQ rounds them "
            "unweighted"
        )
    return importance


def _smooth(model, plan, batches, alpha, info, per_group=False):
    """SmoothQuant on a working copy (the caller's model is never modified): scales folded into
    norms / value projections where free, else returned as input scales of the Linears.
    ``per_group``: each group takes the alpha with the lowest int8 output error on samples of
    its activations (static int8's error for a static run). A Linear that never ran on
    ``batches`` is left unsmoothed, with a note."""
    from mono_quant.core.algorithms import (
        apply_smoothing,
        collect_smoothing_statistics,
        smoothing_plan,
    )

    # A tied weight (lm_head = embed_tokens) is never smoothed: scaling its columns would scale
    # the embedding table it shares.
    names = [
        d.name
        for d in plan.layers.values()
        if d.config is not None and d.kind == "linear" and d.config.activation != "none" and d.tie is None
    ]
    options = plan.options
    static_symmetric = options.activation_symmetric if options.is_static else None
    # statistics and plan read the caller's model (hooks, removed after); only a plan that
    # smooths something needs the copy
    absmax, samples = collect_smoothing_statistics(model, batches, names, samples=per_group, strict=False)
    groups = smoothing_plan(
        model,
        absmax,
        alpha,
        samples,
        static_symmetric=static_symmetric,
        folded_only=bool(options.smoothing_folded_only),
        dynamic_asymmetric=options.activation == "dynamic" and not options.activation_symmetric,
    )
    unseen = [name for name in names if name not in absmax]
    if unseen:
        info.warnings.append(
            f"{len(unseen)} Linear(s) never ran on the smoothing inputs (e.g. {unseen[0]!r}): not smoothed"
        )
    info.metrics["smoothing"] = {
        # per_group: the base candidate; each group took the best of AUTO_ALPHA_CANDIDATES (static: or none)
        "alpha": alpha,
        "per_group": per_group,
        "requested": options.smoothing is not None,
        "folded_only": bool(options.smoothing_folded_only),
        "layers": sum(len(group.linears) for group in groups),
        "input_scales": sum(len(group.linears) for group in groups if group.source is None),
    }
    if not groups:
        return model, {}
    with torch.inference_mode(False), torch.no_grad():
        # copied here, not under a caller's inference_mode: the copy's weights are scaled in place
        work = copy.deepcopy(model)
        input_scales = apply_smoothing(work, groups)
    # The copy must stay the float model it was (static calibration and GPTQ run it): a Linear
    # whose weight became W * s divides its input by s, as its quantized form will.
    modules = dict(work.named_modules())
    for name, scale in input_scales.items():
        modules[name].register_forward_pre_hook(_DivideInput(scale))
    return work, input_scales


class _DivideInput:
    """Forward pre-hook ``x -> x / scale`` (a class, not a closure: models stay picklable)."""

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x / self.scale.to(device=x.device, dtype=x.dtype), *args[1:])


def _gptq(model, plan, batches, progress, info, weight_cache=None) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ's weights for every Linear the plan gives ``method="gptq"``, in the stored layout
    (those ``weight_cache`` holds for the same config are reused, not recomputed)."""
    from mono_quant.core.algorithms import gptq_quantize_model

    configs = {d.name: d.config for d in plan.layers.values() if d.config is not None and d.config.method == "gptq"}
    cached = {}
    if weight_cache is not None:
        cached = {n: weight_cache[_cache_key(n, c)] for n, c in configs.items() if _cache_key(n, c) in weight_cache}
        configs = {n: c for n, c in configs.items() if n not in cached}
    if not configs:
        return cached
    specs = {name: (config.weight_spec, config.group_size) for name, config in configs.items()}
    steps = max((c.clip_search_steps for c in configs.values()), default=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = gptq_quantize_model(
            model,
            batches,
            specs,
            progress=lambda stage, fraction: progress.report("gptq", fraction),
            clip_search_steps=steps,
        )
    info.warnings.extend(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    return {**cached, **{name: stored_weight_tensors(qt, configs[name]) for name, qt in chosen.items()}}


def mode_name(options: QuantizeOptions) -> str:
    if options.bits == 16:
        return "cast"
    if options.bits == 4 or options.weight_only:
        return "weight_only"
    return "dynamic" if options.dynamic else "static"


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
    """Observe each named layer's inputs over the calibration batches (a smoothed layer's
    input-dividing hook runs first: the observer sees what the quantized layer will quantize)."""
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
        with ObservedForward(model, [model.get_submodule(name) for name in layer_names], device) as forward:
            for batch, size in progress.track(batches, "calibrate", total=total):
                forward.run(batch)
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
    options = options_from_config(
        config,
        static=True,
        dtype=dtype,
        symmetric=symmetric,
        per_channel=per_channel,
        observer_type=observer_type,
        num_calibration_samples=num_calibration_samples,
        activation_scheme=None if activation_symmetric is None else ("symmetric" if activation_symmetric else None),
        layer_types=layer_types,
        include=include,
        exclude=exclude,
        min_params=min_params or None,
        calibration_batch_size=calibration_batch_size,
        progress_callback=progress_callback,
    )
    return quantize_planned(model, options, calibration_data, show_progress=show_progress)
