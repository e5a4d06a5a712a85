"""The quantization plan: for every layer, what it becomes or why it stays float.

``quantize()`` turns (model or state_dict, :class:`QuantizeOptions`) into a
:class:`QuantizationPlan` before touching a weight. The module path (``core/quantizers``), the
tensor-by-tensor state_dict / streaming file path (``io/formats``) and the exporters all read
it, so a model gives the same decisions whichever way it arrives: one function,
:func:`decide`, makes every decision from the layer's kind, name and shape.

Policies decided here, once:

* Embedding tables get ``embedding_bits`` (8 by default, per row), never activation
  quantization.
* The output head (``lm_head``, or whatever Linear shares its weight with an embedding) gets
  ``lm_head_bits``: 8 in int4 runs by default (int4 there costs LLMs several perplexity
  points), 16 keeps it float.
* Convolutions and LSTM/GRU take int8 weights (no fast int4 kernels): int4 runs store them int8.
* A group size that does not divide a layer's input features gives a partial last group.
* Shared parameters (tied embeddings) form a tie group: quantized once when every member gets
  the same weight config, stored once in files, never left as an empty tensor.

The stored layout of a quantized weight is declared once too: :func:`weight_layout`.

Example:
    >>> from torch import nn
    >>> plan = plan_module(nn.Sequential(nn.Linear(576, 64)), QuantizeOptions(bits=4))
    >>> plan.layers["0"].config.group_size, plan.layers["0"].config.groups(576)
    (128, 5)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mono_quant.core.options import (
    LAYER_KINDS,
    Precision,
    QuantizeOptions,
    compile_pattern,
    default_activation_symmetric,
    parse_precision,
)
from mono_quant.core.schemes import Granularity, PerChannel, PerGroup, QuantSpec
from mono_quant.errors import ConfigurationError

__all__ = [
    "ACTIVATION_MODES",
    "LayerQuantConfig",
    "LayerDecision",
    "QuantizationPlan",
    "TensorLayout",
    "weight_layout",
    "WEIGHT_TENSOR_NAMES",
    "decide",
    "plan_module",
    "plan_tensors",
    "module_kind",
    "tensor_kind",
    "LAYER_CLASSES",
    "compile_overrides",
    "precision_of",
]

ACTIVATION_MODES = ("none", "dynamic", "static")
# kind name -> float module types (the ``layer_types`` option names these kinds)
LAYER_CLASSES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "embedding": (nn.Embedding,),
    "lstm": (nn.LSTM,),
    "gru": (nn.GRU,),
}
assert tuple(LAYER_CLASSES) == LAYER_KINDS  # one list of kinds: options.LAYER_KINDS names these


@dataclass(frozen=True)
class LayerQuantConfig:
    """How one layer's weight is quantized and its inputs treated. Frozen and self-checking.

    * ``bits``: 8 or 4 (weights).
    * ``symmetric``: symmetric or asymmetric weight grid.
    * ``group_size``: size of the input-axis groups (int4); None means per output channel. A
      group size that does not divide the input features leaves a partial last group.
    * ``activation``: "none" (weight-only), "dynamic" (per-token int8 at run time) or
      "static" (per-tensor int8 qparams from calibration).
    * ``activation_symmetric``: grid of the activations, the static qparams or each token's
      at run time (dynamic); default asymmetric (a token's ``[min, max]`` on 256 levels with
      its own zero point), symmetric: ``max|x| / 127``.
    * ``per_channel``: False gives one scale for the whole weight (int8 only).
    * ``clip_search_steps``: MSE clipping search at quantization time (0 = plain min/max).
    * ``method``: how the weight was rounded ("rtn", "hqq", "gptq"); informational once stored.
    * ``float_zero_point``: zero points are float (HQQ's asymmetric grids), not integers.
    * ``smoothed_input``: the layer divides its input by a SmoothQuant scale (``input_smoothing``)
      before quantizing it, where the scale could not be folded into what produces the input.
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    activation: str = "none"
    activation_symmetric: bool | None = None  # None: the mode's default (see above)
    per_channel: bool = True
    clip_search_steps: int = 0
    method: str = "rtn"
    float_zero_point: bool = False
    smoothed_input: bool = False

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.symmetric)  # validates bits
        if self.activation not in ACTIVATION_MODES:
            raise ConfigurationError(
                f"unknown activation mode {self.activation!r}",
                suggestion=f"Use one of: {', '.join(ACTIVATION_MODES)}.",
            )
        if self.activation_symmetric is None:
            object.__setattr__(self, "activation_symmetric", default_activation_symmetric(self.activation))
        if self.group_size is not None:
            PerGroup(self.group_size)  # validates the size
        if self.bits == 4 and self.group_size is None:
            raise ConfigurationError(
                "int4 weights are quantized group-wise and need a group_size",
                suggestion="Pass group_size=128 (or 32/64 for more accuracy).",
            )

    @property
    def weight_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric)

    @property
    def granularity(self) -> Granularity:
        return PerGroup(self.group_size) if self.group_size else PerChannel(0)

    def groups(self, in_features: int) -> int:
        """Groups along the input axis (the last one may be partial)."""
        return math.ceil(in_features / self.group_size) if self.group_size else 1

    def weight_key(self) -> tuple:
        """What decides the stored weight tensors (not the activation handling)."""
        keys = ("bits", "symmetric", "group_size", "per_channel", "clip_search_steps", "method", "float_zero_point")
        return tuple(getattr(self, k) for k in keys)

    def same_weight(self, other: LayerQuantConfig) -> bool:
        """Whether two layers with these configs store identical weight tensors (a tie can
        then share one quantized copy; activation handling may differ)."""
        return self.weight_key() == other.weight_key()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerQuantConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# -- the stored layout, declared once --------------------------------------------------------------
WEIGHT_TENSOR_NAMES = ("qweight", "weight_scale", "weight_zero_point")


@dataclass(frozen=True)
class TensorLayout:
    """One stored tensor of a quantized weight: its name (a suffix of the layer's), dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def weight_layout(config: LayerQuantConfig, shape: tuple[int, ...]) -> list[TensorLayout]:
    """The tensors a quantized weight of ``shape`` ``[out, ..., in]`` is stored as.

    * ``qweight``: int8 of the weight's shape; int4: uint8 ``[out, in // 2]``, two values per
      byte, element ``2i`` in the low nibble (``in`` is even for int4: the plan sends odd
      widths to int8).
    * ``weight_scale``: fp32 ``[out]`` per channel, ``[out, ceil(in / group_size)]`` per group.
    * ``weight_zero_point``: absent for symmetric int8; int8 ``[out]`` for asymmetric int8;
      uint8 (0..15) of the scale's shape for int4; fp32 of the scale's shape when
      ``float_zero_point`` (HQQ).

    Example:
        >>> [t.shape for t in weight_layout(LayerQuantConfig(bits=4, symmetric=False, group_size=128), (64, 576))]
        [(64, 288), (64, 5), (64, 5)]
    """
    rows, cols = shape[0], shape[-1]
    qparam_shape = (rows, config.groups(cols)) if config.group_size else (rows,)
    if config.bits == 4:
        q = TensorLayout("qweight", torch.uint8, (*shape[:-1], cols // 2))
    else:
        q = TensorLayout("qweight", torch.int8, tuple(shape))
    layout = [q, TensorLayout("weight_scale", torch.float32, qparam_shape)]
    if not (config.symmetric and config.bits == 8):
        zp_dtype = torch.uint8 if config.bits == 4 else torch.int8
        if config.float_zero_point:
            zp_dtype = torch.float32
        layout.append(TensorLayout("weight_zero_point", zp_dtype, qparam_shape))
    return layout


# -- decisions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDecision:
    """What one layer becomes.

    ``config`` is set for a quantized layer; ``cast`` for a bits=16 cast; neither when the
    layer stays float, with ``reason`` saying why. ``note`` explains a policy that changed
    the run's setting for this layer (lm_head at 8 bits, conv stored int8...). ``tie`` names
    the first layer of its tie group when the weight is shared.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    config: LayerQuantConfig | None = None
    cast: torch.dtype | None = None
    reason: str | None = None
    note: str | None = None
    tie: str | None = None
    candidate: bool = True  # False: its kind is not in layer_types (not reported as skipped)
    output_head: bool = False  # the model's output head (lm_head policies apply)

    @property
    def quantized(self) -> bool:
        return self.config is not None

    @property
    def changes(self) -> bool:
        return self.config is not None or self.cast is not None

    def metadata(self) -> dict:
        """The file-metadata entry of this layer (see ``io/formats``)."""
        if self.cast is not None:
            return {"kind": "cast", "dtype": str(self.cast).replace("torch.", "")}
        entry = {"kind": "auto", **self.config.to_dict()}
        if self.tie:
            entry["tied_to"] = self.tie
        return entry


@dataclass
class QuantizationPlan:
    """Every candidate layer's decision, in model order, plus the tie groups."""

    options: QuantizeOptions
    layers: dict[str, LayerDecision] = field(default_factory=dict)
    ties: dict[str, list[str]] = field(default_factory=dict)  # first member -> all members
    statistics: str | None = None  # where the run's input statistics come from (see decide())

    @property
    def selected(self) -> list[str]:
        return [name for name, d in self.layers.items() if d.changes]

    @property
    def skipped(self) -> dict[str, str]:
        return {name: d.reason for name, d in self.layers.items() if not d.changes and d.candidate}

    @property
    def notes(self) -> list[str]:
        return [f"{name}: {d.note}" for name, d in self.layers.items() if d.note]

    def shared_with(self, name: str) -> str | None:
        """The layer whose quantized weight ``name`` can reuse (same tie group, same weight
        config, decided earlier), else None."""
        decision = self.layers.get(name)
        if decision is None or decision.tie is None or decision.config is None:
            return None
        for member in self.ties.get(decision.tie, ()):
            if member == name:
                return None
            other = self.layers.get(member)
            if other is not None and other.config is not None and other.config.same_weight(decision.config):
                return member
        return None


def module_kind(module: nn.Module) -> str | None:
    """The kind name of a module we quantize (exact type), else None."""
    for kind, classes in LAYER_CLASSES.items():
        if type(module) in classes:
            return kind
    return None


def tensor_kind(name: str, shape: tuple[int, ...]) -> str | None:
    """The kind of layer a floating ``*.weight`` tensor of a state_dict belongs to, from its
    name and shape alone (files carry no module types): embedding tables are recognised by
    "embed" in the name, 3-D / 4-D weights are convolutions, other 2-D weights Linears."""
    if not name.endswith(".weight") or len(shape) < 2:
        return None
    layer = name[: -len(".weight")]
    if len(shape) == 3:
        return "conv1d"
    if len(shape) == 4:
        return "conv2d"
    if len(shape) > 4:
        return None
    return "embedding" if "embed" in layer.lower() else "linear"


def _is_output_head(name: str, kind: str, tied_to_embedding: bool) -> bool:
    return kind == "linear" and (name.split(".")[-1] == "lm_head" or tied_to_embedding)


def compile_overrides(options: QuantizeOptions) -> tuple[tuple[re.Pattern, str, Precision], ...]:
    """``layer_overrides`` compiled once per plan: ``(pattern, its text, precision)``."""
    return tuple(
        (compile_pattern(pattern), pattern, parse_precision(precision))
        for pattern, precision in (options.layer_overrides or ())
    )


def precision_of(decision: LayerDecision, options: QuantizeOptions) -> str:
    """The precision name (``layer_overrides``' vocabulary) of what ``decision`` makes of its
    layer: ``int4-g128``, ``int8``, ``int8-weight-only`` (int8 run, float activations), ``fp16``,
    ``bf16`` or ``float``. ``layer_overrides={name: precision_of(d)}`` reproduces the decision."""
    if decision.cast is not None:
        return Precision(cast=decision.cast).name
    config = decision.config
    if config is None:
        return "float"
    if config.bits == 4:
        return f"int4-g{config.group_size}"
    weight_only = config.activation == "none" and options.activation != "none"
    return Precision(bits=8, weight_only=weight_only).name


def decide(
    name: str,
    kind: str,
    shape: tuple[int, ...],
    options: QuantizeOptions,
    *,
    n_params: int | None = None,
    output_head: bool = False,
    include: Iterable | None = None,
    exclude: Iterable | None = None,
    overrides: Iterable | None = None,
    statistics: str | None = None,
) -> LayerDecision:
    """The decision for one layer: ``kind`` from :data:`LAYER_CLASSES`, ``shape`` of its weight
    (``[out, in]`` for Linear, ``[num, dim]`` for Embedding, ``[out, in, k...]`` for conv).

    ``include`` / ``exclude`` / ``overrides`` are the compiled patterns (compiled once per plan).
    A ``layer_overrides`` entry matching the layer replaces the run's precision (and the
    embedding / head policies) for it; what the layer kind cannot take still applies (int8 for
    convolutions, RNNs and odd widths, float activations for tables and heads). ``statistics``:
    where the run's input statistics come from ("calibration data", "random tokens" or None),
    which decides the default rounding method (``QuantizeOptions.layer_method``)."""
    include = tuple(include if include is not None else (compile_pattern(p) for p in options.include))
    exclude = tuple(exclude if exclude is not None else (compile_pattern(p) for p in options.exclude))
    overrides = tuple(overrides if overrides is not None else compile_overrides(options))
    base = {"name": name, "kind": kind, "shape": tuple(shape), "output_head": output_head}
    if options.layer_types is not None and kind not in options.layer_types:
        return LayerDecision(**base, reason=f"layer type {kind!r} not in layer_types", candidate=False)
    if include and not any(p.fullmatch(name) for p in include):
        return LayerDecision(**base, reason="not matched by any include pattern")
    if any(p.fullmatch(name) for p in exclude):
        return LayerDecision(**base, reason="matched an exclude pattern")
    if n_params is None:
        n_params = math.prod(shape)
    if n_params < options.min_params:
        return LayerDecision(**base, reason=f"{n_params} parameters < min_params={options.min_params}")
    if options.bits == 16:
        return LayerDecision(**base, cast=options.float_dtype)

    bits, activation, note = options.bits, options.activation, None
    group_size = options.effective_group_size
    override = next(((text, precision) for pattern, text, precision in overrides if pattern.fullmatch(name)), None)
    if override is not None:
        # no note: info.layer_overrides records what the overrides did
        text, precision = override
        if precision.bits is None:
            if precision.cast is not None:
                return LayerDecision(**base, cast=precision.cast)
            return LayerDecision(**base, reason=f"kept float (layer_overrides {text!r})")
        bits, group_size = precision.bits, precision.group_size or group_size
        if bits == 4 or precision.weight_only:
            activation = "none"
    if kind == "embedding":
        bits = bits if override is not None else options.effective_embedding_bits
        activation = "none"
    elif output_head:
        if override is None:
            bits = options.effective_lm_head_bits
            if bits == 16:
                return LayerDecision(**base, reason="output head kept float (lm_head_bits=16)")
            if bits != options.bits:
                note = f"output head quantized to {bits} bits (lm_head_bits; int4 heads cost LLMs accuracy)"
        # Its activations stay float: per-token int8 logits inputs cost SmolLM2 2% perplexity
        # (int8 dynamic 15.05 vs 14.73 with a weight-only head, fp32 14.43), for one layer.
        activation = "none"
    elif kind in ("conv1d", "conv2d", "lstm", "gru"):
        if bits == 4:
            bits, note = 8, f"int4 is not available for {kind}; stored int8 per channel"
        if kind in ("lstm", "gru") or activation == "dynamic":
            activation = "none"  # float compute on int8 weights (no fast int8 conv / RNN kernel)
    if bits == 4 and shape[-1] % 2:
        bits, activation = 8, "none"
        note = f"in_features={shape[-1]} is odd and int4 packs two values per byte; stored int8"
    # 8-bit tables and heads in an int4 run are symmetric per row: what Q8_0 (llama.cpp) and
    # W8A16 (compressed-tensors, vLLM) store, and int8 needs no zero point to be accurate. An
    # int4 layer in an int8 run (an override) takes int4's own default grid, asymmetric.
    symmetric = True if (bits == 8 and options.bits == 4) else options.symmetric
    if override is not None and bits == 4 and options.bits != 4:
        symmetric = options.scheme == "symmetric"
    # GPTQ / HQQ round Linear weights; tables, convolutions and RNNs keep round-to-nearest.
    method = options.layer_method(bits, statistics, output_head) if kind == "linear" else "rtn"
    config = LayerQuantConfig(
        bits=bits,
        symmetric=symmetric,
        group_size=group_size if bits == 4 else None,
        activation=activation,
        activation_symmetric=options.activation_symmetric,
        per_channel=options.effective_per_channel or bits == 4,
        clip_search_steps=options.clip_search_steps_for(method) if bits == 4 or method == "gptq" else 0,
        method=method,
        float_zero_point=method == "hqq" and not symmetric,
    )
    return LayerDecision(**base, config=config, note=note)


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return getattr(module, "weight_ih_l0", None)  # LSTM / GRU


def plan_module(model: nn.Module, options: QuantizeOptions, statistics: str | None = None) -> QuantizationPlan:
    """The plan for an ``nn.Module``: every layer of a kind we quantize, in model order.
    ``statistics``: where the run's input statistics come from, as :func:`decide` takes it."""
    include = tuple(compile_pattern(p) for p in options.include)
    exclude = tuple(compile_pattern(p) for p in options.exclude)
    overrides = compile_overrides(options)
    candidates: list[tuple[str, str, nn.Module]] = []
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        candidates.append((name, kind, module))
        weight = _weight_of(module)
        if weight is not None:
            users.setdefault(id(weight), []).append(name)
    kinds = {name: kind for name, kind, _ in candidates}
    ties = {group[0]: group for group in users.values() if len(group) > 1}
    tie_of = {member: first for first, group in ties.items() for member in group}
    output_heads = _output_heads(model)
    plan = QuantizationPlan(options=options, ties=ties, statistics=statistics)
    for name, kind, module in candidates:
        weight = _weight_of(module)
        shape = tuple(weight.shape) if weight is not None else ()
        tied_to_embedding = any(kinds.get(m) == "embedding" for m in ties.get(tie_of.get(name, ""), ()))
        decision = decide(
            name,
            kind,
            shape,
            options,
            # the weight's size, as the tensor path sees it (LSTM / GRU: all their weights)
            n_params=sum(p.numel() for p in module.parameters(recurse=False)) if kind in ("lstm", "gru") else None,
            output_head=name in output_heads or _is_output_head(name, kind, tied_to_embedding),
            include=include,
            exclude=exclude,
            overrides=overrides,
            statistics=statistics,
        )
        if name in tie_of:
            decision = LayerDecision(**{**decision.__dict__, "tie": tie_of[name]})
        plan.layers[name] = decision
    return plan


def _output_heads(model: nn.Module) -> set[str]:
    """Names of the output-embedding Linears transformers models declare."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return set()
    try:
        head = getter()
    except Exception:  # some models raise NotImplementedError
        return set()
    return {name for name, module in model.named_modules() if module is head and head is not None}


def plan_tensors(
    entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    options: QuantizeOptions,
    shared: dict[str, str] | None = None,
) -> QuantizationPlan:
    """The plan for a state_dict or a file, from ``(tensor name, shape, dtype)`` alone.

    Layers are named by their ``*.weight`` tensor (minus the suffix) and their kind inferred
    by :func:`tensor_kind`; ``shared`` maps tensor names to the first tensor with the same
    storage (tied weights of a state_dict).
    """
    include = tuple(compile_pattern(p) for p in options.include)
    exclude = tuple(compile_pattern(p) for p in options.exclude)
    overrides = compile_overrides(options)
    entries = list(entries)
    shared = shared or {}
    layer_of = {name: name[: -len(".weight")] for name, shape, dtype in entries if dtype.is_floating_point}
    kinds = {
        layer_of[name]: tensor_kind(name, tuple(shape))
        for name, shape, dtype in entries
        if name in layer_of and tensor_kind(name, tuple(shape))
    }
    ties: dict[str, list[str]] = {}
    for name, first in shared.items():
        if name in layer_of and first in layer_of and layer_of[first] in kinds:
            group = ties.setdefault(layer_of[first], [layer_of[first]])
            group.append(layer_of[name])
    tie_of = {member: first for first, group in ties.items() for member in group}
    plan = QuantizationPlan(options=options, ties=ties)
    for name, shape, _dtype in entries:
        layer = layer_of.get(name)
        kind = kinds.get(layer) if layer is not None else None
        if kind is None:
            continue
        tied_to_embedding = any(kinds.get(m) == "embedding" for m in ties.get(tie_of.get(layer, ""), ()))
        decision = decide(
            layer,
            kind,
            tuple(shape),
            options,
            output_head=_is_output_head(layer, kind, tied_to_embedding),
            include=include,
            exclude=exclude,
            overrides=overrides,
        )
        if layer in tie_of:
            decision = LayerDecision(**{**decision.__dict__, "tie": tie_of[layer]})
        plan.layers[layer] = decision
    return plan
