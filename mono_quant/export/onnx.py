"""ONNX export: an ONNX Runtime graph whose quantized layers run on integer kernels.

How the file is made: the quantized model's float twin (every quantized layer swapped for a
float layer carrying its *dequantized* weight, everything else the quantized model's own
modules) is exported with ``torch.onnx.export(..., dynamo=True)``; then each node that came
from a quantized layer is rewritten to take the stored integers instead of the float weight:

====================  ==========================================  ==========================
our layer / mode      ONNX written                                ORT CPU kernel that runs
====================  ==========================================  ==========================
Linear int4           ``com.microsoft.MatMulNBits`` bits=4        MatMulNBits
Linear int8 w-only    ``com.microsoft.MatMulNBits`` bits=8        MatMulNBits
Linear int8 dynamic   per-token int8 in plain ops + MatMulInteger MatMulInteger
  (per_tensor option) DynamicQuantizeLinear + MatMulInteger ...   DynamicQuantizeMatMul
Linear int8 static    QuantizeLinear + ``MatMulIntegerToFloat``   MatMulIntegerToFloat
Embedding int8        DequantizeLinear (axis 0) -> Gather         DequantizeLinear + Gather
Conv int8             DequantizeLinear (axis 0) -> Conv;          Conv (fp32), or QLinearConv
                      static: Q/DQ on the input too               when a Q follows (static)
====================  ==========================================  ==========================

Weight-only layers run with fp32 activations (``accuracy_level=0``), like ours (whose CPU
kernel keeps ~16-bit activations). The Linear bias stays a float Add after the integer
product: a float bias is what blocks ORT's QDQ fusion of a 2-D MatMul (it becomes a float
Gemm first), which is why static layers are written as MatMulIntegerToFloat directly.

Why the dequantized twin rather than ``result.original``: the graph must be the quantized
model's, which can differ from the original outside the quantized layers (smoothing folds
scales into norms; a scale with no layer to fold into stays a float Mul ahead of the
integer kernel, as our layer applies it), and the twin's weights let every rewritten node be checked against the
layer it replaces (the exported initializer must equal the dequantized weight exactly).

Our ``dynamic`` mode quantizes activations per token (symmetric int8, one scale per row).
ORT has no fused kernel for per-row activation scales, so by default the file spells that
grid out in plain ops (Abs, ReduceMax, Div, Round, Clip, Cast) feeding MatMulInteger
(int8 x int8 -> int32) and the two scales: ORT then computes what our model computes
(MiniLM embeddings: cosine 0.9999 mean to ours). ``dynamic_activations="per_tensor"`` writes
ORT's own dynamic mode instead (``quantize_dynamic``'s graph: DynamicQuantizeLinear, one
asymmetric uint8 scale per tensor, fused into DynamicQuantizeMatMul): faster, but coarser
(MiniLM: cosine ~0.992 to ours, 0.994 to fp32, against 0.997 for ours).

Layouts followed (ONNX Runtime ``docs/ContribOperators.md``, MatMulNBits, and
``onnxruntime/quantization/matmul_nbits_quantizer.py``): ``B`` uint8 ``[N, k_blocks,
block_size * bits / 8]`` codes along K, low bits first; ``k_blocks = ceil(K / block_size)``
(K padded to whole blocks: our partial last group maps onto it); ``scales`` ``[N * k_blocks]``;
``zero_points`` packed like ``B`` per row (``[N * ceil(k_blocks * bits / 8)]``) or, for
float zero points (HQQ), unpacked ``[N * k_blocks]`` of A's type; absent means the grid's
middle (8 for 4 bits, 128 for 8 bits). Dequantized ``= (code - zero_point) * scale``, our
formula. ``block_size`` must be a power of two >= 16.

Mixed precision (``layer_overrides``, ``max_accuracy_loss``): each layer is rewritten from its
own config, so a MatMulNBits carries that layer's bits and block size, W8A8 layers get the int8
dynamic / static form above and float (or fp16 / bf16 cast) layers stay float MatMuls (fp32 in the
graph, their values unchanged).

Limits: recurrent layers, int4 embeddings and 16-bit casts are refused (ConfigurationError,
never a silently fp32 file); a tied embedding / lm_head pair is written twice (a DQ int8
table for the Gather, MatMulNBits codes for the head: +V*D bytes); the float twin passes
through one protobuf, so models above ~2 GiB fp32 are refused; only the CPU execution
provider is tested. Peak memory is about three times the fp32 model (twin, graph, file).

Loading it: :func:`onnxruntime_session` (the session options this file was tested with).

Example:
    >>> result = quantize(model, bits=4, group_size=32)                        # doctest: +SKIP
    >>> result.save("model.onnx", format="onnx", sample_inputs=batch)          # doctest: +SKIP
    >>> session = onnxruntime_session("model.onnx")                            # doctest: +SKIP
    >>> session.run(None, {k: v.numpy() for k, v in batch.items()})            # doctest: +SKIP
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mono_quant.errors import ConfigurationError, InputError, QuantizationError
from mono_quant.export import ExportFormat

__all__ = [
    "FORMAT",
    "SUPPORTED_MODES",
    "INTEGER_KERNELS",
    "check",
    "export_onnx",
    "onnxruntime_session",
    "optimized_op_types",
]

SUPPORTED_MODES = ("dynamic", "weight_only", "static")
# Ops of an ORT-optimized graph that compute with integer weights (what the tests look for).
INTEGER_KERNELS = frozenset(
    {
        "MatMulNBits",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "QLinearConv",
        "ConvInteger",
        "QGemm",
    }
)
_MS_DOMAIN = "com.microsoft"
# MatMulNBits takes power-of-two blocks of at least 16 codes (contrib-op spec).
_MIN_BLOCK = 16
# Block used to carry a per-channel int8 weight in MatMulNBits: the channel's scale repeats
# in each block, so the values are exactly ours; 128 keeps the repeated scales at 3% of B.
_PER_CHANNEL_BLOCK = 128
# One ModelProto serializes to at most 2 GiB (protobuf); the float twin passes through one.
_PROTO_LIMIT = 2**31 - 2**26


# -- check: what the format can represent -----------------------------------------------------
def check(info: Any) -> None:
    """Raise ConfigurationError unless ONNX can express this quantization.

    ``info`` is a :class:`~mono_quant.core.quantizers.QuantizationInfo` or a plain mapping
    with the keys ``bits``, ``mode`` ("dynamic" | "weight_only" | "static" | "cast"),
    ``symmetric`` and ``group_size`` (what the service has at submission, before any
    quantization ran; ``group_size=None`` means per channel for int8 and the default 128 for
    int4), or a :class:`~mono_quant.core.options.QuantizeOptions`. With a ``QuantizationInfo``
    (or a ``layer_configs`` key) the per-layer configs are checked too: recurrent layers and
    int4 embeddings are refused. ``symmetric`` never matters: both grids are expressible.

    Example:
        >>> check({"bits": 4, "mode": "weight_only", "symmetric": False, "group_size": 128})
        >>> check({"bits": 16, "mode": "cast"})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        mono_quant.errors.ConfigurationError: ONNX export writes integer graphs ...
    """
    if isinstance(info, Mapping):
        bits, mode = info.get("bits"), info.get("mode")
        group_size = info.get("group_size")
        layer_configs: Mapping = info.get("layer_configs") or {}
    elif hasattr(info, "activation") and hasattr(info, "weight_only"):  # a QuantizeOptions
        bits, group_size, layer_configs = info.bits, info.group_size, {}
        mode = "cast" if bits == 16 else {"none": "weight_only"}.get(info.activation, info.activation)
    else:
        bits, mode = getattr(info, "bits", None), getattr(info, "mode", None)
        group_size = getattr(info, "group_size", None)
        layer_configs = getattr(info, "layer_configs", None) or {}
    if mode not in SUPPORTED_MODES:
        hint = " 16-bit casts are plain float graphs: export the model itself with torch.onnx.export." * (
            mode == "cast"
        )
        raise ConfigurationError(
            f"ONNX export writes integer graphs and cannot represent mode={mode!r} (bits={bits!r})",
            suggestion=f"Quantize with one of the modes it can: {', '.join(SUPPORTED_MODES)} "
            f"(bits=8 dynamic / weight_only / static, bits=4 weight_only).{hint}",
        )
    if bits not in (4, 8):
        raise ConfigurationError(
            f"ONNX export takes 4- or 8-bit weights, got bits={bits!r}",
            suggestion="Quantize with bits=8 or bits=4.",
        )
    if bits == 4 and mode != "weight_only":
        raise ConfigurationError(
            f"int4 weights export as MatMulNBits, a weight-only kernel; mode={mode!r} has no ONNX Runtime form",
            suggestion="Use bits=4 (weight-only) or bits=8 with dynamic / static activations.",
        )
    _check_group(group_size, bits, mode, "the run")
    for name, config in layer_configs.items():
        kind = config.get("kind", "")
        if kind in ("cast",):
            continue
        if kind in _REFUSED_KINDS:
            raise _refused_kind(name, kind)
        if kind == "QuantizedEmbedding" and config.get("bits") == 4:
            raise _int4_embedding(name)
        layer_activation = config.get("activation", "none")
        layer_mode = {"none": "weight_only"}.get(layer_activation, layer_activation)
        _check_group(config.get("group_size"), config.get("bits", bits), layer_mode, f"layer {name!r}")


_REFUSED_KINDS = ("QuantizedLSTM", "QuantizedGRU", "QuantizedRNN")


def _refused_kind(name: str, kind: str) -> ConfigurationError:
    return ConfigurationError(
        f"layer {name!r} is a {kind}: ONNX's LSTM/GRU ops take float weights only, so its int8 weights "
        "cannot be written without turning them back into fp32",
        suggestion="Exclude recurrent layers from quantization (layer_types=['linear', 'embedding']) or use "
        "mono_quant's own safetensors format.",
    )


def _int4_embedding(name: str) -> ConfigurationError:
    return ConfigurationError(
        f"layer {name!r} is an int4 embedding, which this ONNX export does not write (ONNX Runtime's int4 gather "
        "is a different kernel family)",
        suggestion="Keep embeddings at 8 bits (the default in int4 runs), or exclude the layer.",
    )


def _check_group(group_size: int | None, bits: int | None, mode: str | None, where: str) -> None:
    if group_size is None:  # per channel (int8), or int4's default group size (128)
        return
    if mode in ("dynamic", "static"):
        raise ConfigurationError(
            f"{where}: int8 {mode} with group_size={group_size} has no ONNX Runtime kernel "
            "(MatMulInteger and QDQ MatMul take one weight scale per output channel)",
            suggestion=f"Drop group_size for {mode} int8 (per-channel), or use weight_only=True, "
            "which exports group-wise int8 as MatMulNBits.",
        )
    if group_size < _MIN_BLOCK:
        raise ConfigurationError(
            f"{where}: group_size={group_size} is below MatMulNBits' smallest block ({_MIN_BLOCK})",
            suggestion="Quantize with group_size=16, 32, 64 or 128.",
        )


# -- export -----------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    original: Any = None,
    info: Any = None,
    tokenizer: Any = None,
    sample_inputs: Any = None,
    dynamic_activations: str = "per_token",
) -> Path:
    """Write ``model`` (a quantized model from :func:`mono_quant.quantize`) as ONNX to ``path``.

    ``sample_inputs``: a dict of tensors (keyword arguments of ``forward``), a tuple (positional
    arguments) or one tensor; they fix the traced graph (every dimension is exported dynamic
    where the model allows). Without them a transformers model falls back to its
    ``dummy_inputs`` (``input_ids`` only, which is what BERT/Llama-style models need).
    ``original`` and ``tokenizer`` are accepted for the registry's uniform call and unused:
    the graph comes from ``model`` itself. ``dynamic_activations`` (layers in dynamic mode):
    ``"per_token"`` (default) writes our per-token int8 grid in plain ops + MatMulInteger, so
    ORT computes what ``model`` computes; ``"per_tensor"`` writes ORT's own dynamic mode
    (DynamicQuantizeLinear, fused into DynamicQuantizeMatMul): faster, less accurate. Returns
    the path written.

    Example:
        >>> r = quantize(nn.Sequential(nn.Linear(64, 64)), bits=8, dynamic=True)  # doctest: +SKIP
        >>> export_onnx(r.model, "mlp.onnx", sample_inputs=(torch.randn(2, 64),))   # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"ONNX export needs a model with a forward, got {type(model).__name__}",
            suggestion="Quantize the nn.Module itself (not a state_dict or a weights file) to export ONNX.",
        )
    if info is not None:
        check(info)
    import onnx

    if dynamic_activations not in _DYNAMIC_ACTIVATIONS:
        raise ConfigurationError(
            f"unknown dynamic_activations={dynamic_activations!r}",
            suggestion=f"Use one of: {', '.join(_DYNAMIC_ACTIVATIONS)}.",
        )
    layers = _quantized_layers(model)
    if not layers:
        raise InputError(
            "the model has no quantized layer: its ONNX export would be the float model",
            suggestion="Export the result of mono_quant.quantize(...) (result.model).",
        )
    args, kwargs = _sample_arguments(model, sample_inputs)
    float_layers = {id(module): _float_layer(module) for module in layers.values()}
    twin = _float_twin(model, float_layers)
    proto = _torch_export(twin, args, kwargs)
    weights = {name: float_layers[id(module)].weight.detach().numpy() for name, module in layers.items()}
    rewriter = _GraphRewriter(proto, layers, weights, dynamic_activations)
    rewriter.run()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto.producer_name = "mono_quant"
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return path


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from mono_quant.modules import QuantizedModule

    layers = {}
    # every name a layer is reachable by (a shared layer has several): each must be rewritten
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedModule):
            kind = type(module).__name__
            if kind in _REFUSED_KINDS:
                raise _refused_kind(name, kind)
            if not isinstance(module, _SUPPORTED_LAYERS()):
                raise ConfigurationError(
                    f"layer {name!r} is a {kind}, which the ONNX export has no integer form for",
                    suggestion="Exclude the layer from quantization (exclude=[name]) or use mono_quant's own "
                    "safetensors format.",
                )
            if kind == "QuantizedEmbedding" and module.config.bits == 4:
                raise _int4_embedding(name)
            activation = module.config.activation
            _check_group(module.config.group_size, module.config.bits, _MODE_OF[activation], f"layer {name!r}")
            if module.config.bits == 4 and activation != "none":
                raise ConfigurationError(
                    f"layer {name!r}: int4 weights with {activation} activations have no ONNX Runtime kernel",
                    suggestion="Use weight-only int4 (bits=4) or int8 activations (bits=8).",
                )
            layers[name] = module
    return layers


_DYNAMIC_ACTIVATIONS = ("per_token", "per_tensor")
_MODE_OF = {"none": "weight_only", "dynamic": "dynamic", "static": "static"}


def _SUPPORTED_LAYERS() -> tuple[type, ...]:  # noqa: N802 - a constant, resolved late (modules import order)
    from mono_quant.modules.conv import QuantizedConv1d, QuantizedConv2d
    from mono_quant.modules.embedding import QuantizedEmbedding
    from mono_quant.modules.linear import QuantizedLinear

    return (QuantizedLinear, QuantizedEmbedding, QuantizedConv1d, QuantizedConv2d)


def _sample_arguments(model: nn.Module, sample_inputs: Any) -> tuple[tuple, dict]:
    if sample_inputs is None:
        dummy = getattr(model, "dummy_inputs", None)
        if isinstance(dummy, Mapping) and dummy:
            # transformers models: {"input_ids": [[7, 6, 0, 0, 1], ...]}, enough to trace
            return (), {k: v for k, v in dummy.items() if isinstance(v, torch.Tensor)}
        raise InputError(
            "ONNX export traces the model and needs sample_inputs",
            suggestion="Pass sample_inputs= a dict of tensors (e.g. a tokenizer batch) or a tuple of tensors "
            "for the model's forward, e.g. result.save('model.onnx', format='onnx', sample_inputs=(x,)).",
        )
    if isinstance(sample_inputs, torch.Tensor):
        return (sample_inputs,), {}
    if isinstance(sample_inputs, Mapping):
        return (), dict(sample_inputs)
    if isinstance(sample_inputs, (tuple, list)):
        return tuple(sample_inputs), {}
    raise InputError(
        f"sample_inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(sample_inputs).__name__}",
        suggestion="Pass e.g. sample_inputs=(torch.randn(1, 64),) or a tokenizer's return_tensors='pt' batch.",
    )


def _float_layer(module: nn.Module) -> nn.Module:
    """A float layer computing with ``module``'s dequantized weight (fp32, CPU)."""
    from mono_quant.modules.conv import QuantizedConv1d, QuantizedConv2d
    from mono_quant.modules.embedding import QuantizedEmbedding

    weight = module.dequantized_weight().detach().float().cpu()
    bias = getattr(module, "bias", None)
    if isinstance(module, QuantizedEmbedding):
        layer = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    elif isinstance(module, (QuantizedConv1d, QuantizedConv2d)):
        conv_type = nn.Conv2d if isinstance(module, QuantizedConv2d) else nn.Conv1d
        layer = conv_type(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias is not None,
        )
    elif getattr(module, "input_smoothing", None) is not None:
        layer = _SmoothedLinear(module.in_features, module.out_features, bias=bias is not None)
        layer.register_buffer("input_smoothing", module.input_smoothing.detach().float().cpu().clone())
    else:
        layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach().float().cpu())
    return layer.eval()


class _SmoothedLinear(nn.Linear):
    """The float form of a SmoothQuant layer whose scale could not be folded into the layer
    before it: ``input_smoothing`` (the multiplier ``1 / s`` it stores) stays a float Mul in
    the graph, ahead of the integer kernel that replaces the MatMul."""

    input_smoothing: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * self.input_smoothing, self.weight, self.bias)


def _float_twin(model: nn.Module, float_layers: dict[int, nn.Module]) -> nn.Module:
    """A copy of ``model`` with ``float_layers[id(layer)]`` in place of each quantized layer."""
    # deepcopy with the quantized layers pre-seeded in the memo: the copy gets the float
    # layers in their place and never copies a quantized layer (whose kernel caches, e.g. a
    # oneDNN-prepacked weight, need not be copyable). The caller's model is left untouched.
    twin = copy.deepcopy(model, dict(float_layers))
    twin = twin.float().cpu().eval()
    config = getattr(twin, "config", None)
    if getattr(config, "use_cache", False):
        # transformers decoders return a KV cache object torch.export cannot flatten; the file
        # is the full-sequence forward (logits), the form ORT's own sessions run.
        config.use_cache = False
    size = sum(p.numel() * p.element_size() for p in twin.state_dict().values())
    if size > _PROTO_LIMIT:
        raise InputError(
            f"the model's float graph is {size / 2**30:.1f} GiB, above the 2 GiB a single ONNX protobuf can hold "
            "while the quantized layers are rewritten",
            suggestion="Export a smaller model to ONNX, or use format='gguf' / 'compressed-tensors' for large LLMs.",
        )
    return twin


def _torch_export(twin: nn.Module, args: tuple, kwargs: dict):
    # torch.onnx dynamo export (docs.pytorch.org/docs/stable/onnx_export.html): every input
    # dimension Dim.AUTO, so a batch or sequence of another size runs; export specializes
    # what the model fixes (channels, hidden size) by itself.
    from torch.export import Dim

    def auto(value):
        if isinstance(value, torch.Tensor):
            return {axis: Dim.AUTO for axis in range(value.dim())}
        return None

    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    dynamic = {k: auto(v) for k, v in kwargs.items()} if kwargs else tuple(auto(a) for a in args)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                twin, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic, optimize=True, verbose=False
            )
    except Exception as exc:  # torch.export raises many types; say which and why
        root = exc
        while root.__cause__ is not None:  # the exporter wraps the cause in generic advice
            root = root.__cause__
        raise InputError(
            f"torch.onnx.export (dynamo) could not export the model: {type(root).__name__}: {str(root)[:500]}",
            suggestion="Check that sample_inputs match the model's forward and that torch.export can trace it "
            "(no data-dependent Python control flow).",
        ) from exc
    return program.model_proto


# -- graph rewriting --------------------------------------------------------------------------
def _host_weight(module: nn.Module):
    """``module.quantized_weight()`` with its tensors on the CPU (a model may live on CUDA)."""
    qt = module.quantized_weight()
    qt = copy.copy(qt)
    qt.qdata, qt.scale = qt.qdata.detach().cpu(), qt.scale.detach().cpu()
    qt.zero_point = None if qt.zero_point is None else qt.zero_point.detach().cpu()
    return qt


def _all_nodes(graph):
    """The nodes of ``graph`` and of the subgraphs of its If / Loop / Scan nodes."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: np.ndarray  # the dequantized float weight, as the twin carries it


class _GraphRewriter:
    """Finds the node each quantized layer became and swaps in its integer form."""

    def __init__(
        self,
        proto,
        layers: dict[str, nn.Module],
        weights: dict[str, np.ndarray],
        dynamic_activations: str = "per_token",
    ) -> None:
        from onnx import numpy_helper

        self.proto = proto
        self.dynamic_activations = dynamic_activations
        self.opset = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 18)
        self.graph = proto.graph
        self.layers = {name: _Layer(name, m, weights[name]) for name, m in layers.items()}
        self.initializers = {init.name: init for init in self.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self._to_array = numpy_helper.to_array
        self._from_array = numpy_helper.from_array
        self._new_initializers: dict[str, Any] = {}
        self._by_stem: dict[str, str] = {}
        self._counter = 0

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.initializers:
            return None
        if name not in self._arrays:
            self._arrays[name] = self._to_array(self.initializers[name])
        return self._arrays[name]

    def run(self) -> None:
        import onnx

        if not any(op.domain == _MS_DOMAIN for op in self.proto.opset_import):
            self.proto.opset_import.append(onnx.helper.make_opsetid(_MS_DOMAIN, 1))
        rewritten: set[int] = set()  # ids of the layers rewritten (a shared layer has several names)
        new_nodes = []
        for node in self.graph.node:
            layer = self._layer_of(node)
            replacement = self._rewrite(node, layer) if layer is not None else None
            if replacement is None:
                new_nodes.append(node)
            else:
                new_nodes.extend(replacement)
                rewritten.add(id(layer.module))
        missing = sorted({name for name, layer in self.layers.items() if id(layer.module) not in rewritten})
        if missing:
            raise QuantizationError(
                f"{len(missing)} quantized layer(s) were not found in the exported graph ({', '.join(missing[:5])}): "
                "writing the file would leave them in fp32",
                suggestion="Report this with the model's architecture; meanwhile use mono_quant's safetensors format.",
            )
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        self.graph.initializer.extend(self._new_initializers.values())
        # drop the float weights no node reads any more (nodes of subgraphs included)
        used = {name for node in _all_nodes(self.graph) for name in node.input}
        used |= {o.name for o in self.graph.output}
        keep = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    # which layer a node came from: the torch module path the exporter records per node
    def _layer_of(self, node) -> _Layer | None:
        if node.op_type not in ("MatMul", "Gemm", "Gather", "Conv"):
            return None
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                scopes = ast.literal_eval(prop.value)
                for scope in reversed(scopes):
                    if scope in self.layers:
                        return self.layers[scope]
        return None

    def _name(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}__mq{self._counter}"

    def _add(self, array: np.ndarray, stem: str) -> str:
        """A new initializer; one per ``stem`` (layer name + role), so a layer called twice in
        forward, or two layers sharing a module, store their integers once."""
        if stem in self._by_stem:
            return self._by_stem[stem]
        name = self._by_stem[stem] = self._name(stem)
        self._new_initializers[name] = self._from_array(np.ascontiguousarray(array), name)
        return name

    def _weight_input(self, node, layer: _Layer, transposed: bool) -> int | None:
        """Index of the input holding ``layer``'s weight (exactly equal values), or None."""
        expected = layer.weight.T if transposed else layer.weight
        for index, name in enumerate(node.input):
            value = self.array(name)
            if value is not None and value.shape == expected.shape and np.array_equal(value, expected):
                return index
        return None

    def _rewrite(self, node, layer: _Layer):
        from mono_quant.modules.embedding import QuantizedEmbedding
        from mono_quant.modules.linear import QuantizedLinear

        module = layer.module
        if isinstance(module, QuantizedLinear) and node.op_type in ("MatMul", "Gemm"):
            return self._linear(node, layer)
        if isinstance(module, QuantizedEmbedding) and node.op_type == "Gather":
            return self._embedding(node, layer)
        if node.op_type == "Conv" and not isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            return self._conv(node, layer)
        return None

    # -- Linear ---------------------------------------------------------------------------
    def _linear(self, node, layer: _Layer):
        import onnx.helper as oh

        if node.op_type == "Gemm":
            attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            transposed = not attrs.get("transB", 0)
        else:
            transposed = True  # MatMul(x, W^T)
        index = self._weight_input(node, layer, transposed)
        if index != 1:
            return None
        activation, output = node.input[0], node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        matmul_out = self._name(output) if bias else output
        mode = layer.module.config.activation
        if mode == "none":
            nodes = self._matmul_nbits(activation, matmul_out, layer)
        elif mode == "dynamic":
            nodes = self._dynamic_matmul(activation, matmul_out, layer)
        else:
            nodes = self._static_matmul(activation, matmul_out, layer)
        if bias:
            nodes.append(oh.make_node("Add", [matmul_out, bias], [output], name=self._name(node.name + "_bias")))
        return nodes

    def _matmul_nbits(self, activation: str, output: str, layer: _Layer):
        """Weight-only int4 / int8 -> MatMulNBits (accuracy_level 0: fp32 activations, as ours)."""
        import onnx.helper as oh

        qt = _host_weight(layer.module)
        bits = qt.spec.bits
        q = qt.qdata.to(torch.int16)
        n, k = q.shape
        block = layer.module.config.group_size or _PER_CHANNEL_BLOCK
        blocks = -(-k // block)
        scale = qt.scale.float().reshape(n, -1)
        zp = qt.zero_point
        if scale.shape[1] == 1 and blocks > 1:  # per channel: the scale repeats in each block
            scale = scale.expand(n, blocks)
            zp = None if zp is None else zp.reshape(n, 1).expand(n, blocks)
        if scale.shape[1] != blocks:
            raise QuantizationError(
                f"layer {layer.name!r}: {scale.shape[1]} scales per row for K={k} in blocks of {block} "
                f"(expected ceil(K / block) = {blocks})",
                suggestion="Report this: the stored layout does not match the documented one.",
            )
        offset = 128 if bits == 8 else 0  # MatMulNBits codes are unsigned: int8 shifts by 128
        codes = (q + offset).to(torch.uint8)
        codes = torch.nn.functional.pad(codes, (0, blocks * block - k))  # partial last block
        codes = codes.reshape(n, blocks, block)
        if bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
        inputs = [activation, self._add(codes.numpy(), layer.name + ".qweight"), None]
        inputs[2] = self._add(scale.contiguous().reshape(-1).numpy(), layer.name + ".scales")
        if zp is not None and not zp.is_floating_point() and bool((zp == qt.spec.symmetric_zero_point).all()):
            zp = None  # the grid's middle (8 / 0 -> 128) is MatMulNBits' default: store nothing
        if zp is not None:
            zp = zp.reshape(n, blocks)
            if zp.is_floating_point():  # HQQ-style: unpacked, A's dtype
                inputs.append(self._add(zp.float().reshape(-1).numpy(), layer.name + ".zero_points"))
            else:
                zp_codes = (zp.to(torch.int16) + offset).to(torch.uint8)
                if bits == 4:
                    zp_codes = torch.nn.functional.pad(zp_codes, (0, blocks % 2))
                    zp_codes = zp_codes[:, 0::2] | (zp_codes[:, 1::2] << 4)
                inputs.append(self._add(zp_codes.contiguous().reshape(-1).numpy(), layer.name + ".zero_points"))
        node = oh.make_node(
            "MatMulNBits",
            inputs,
            [output],
            name=self._name(layer.name + "_MatMulNBits"),
            domain=_MS_DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=0,
        )
        return [node]

    def _int8_columns(self, layer: _Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(W^T int8 [K, N], scale [N], zero_point int8 [N] or None)`` of a per-channel int8 layer."""
        qt = _host_weight(layer.module)
        if qt.zero_point is not None and qt.zero_point.is_floating_point():
            raise ConfigurationError(
                f"layer {layer.name!r} has float zero points, which MatMulInteger / DequantizeLinear cannot take",
                suggestion="Export float zero points in weight-only mode (MatMulNBits), or use an integer grid.",
            )
        weight_t = qt.qdata.to(torch.int8).t().contiguous().numpy()
        scale = qt.scale.float().reshape(-1).numpy()
        zp = None if qt.zero_point is None else qt.zero_point.to(torch.int8).reshape(-1).numpy()
        return weight_t, scale, zp

    def _uint8_columns(self, layer: _Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_int8_columns` shifted by 128 into uint8 (the same integers): ``(W^T + 128,
        scale, zero_point + 128 [N])`` for the integer GEMMs (MatMulInteger, MatMulIntegerToFloat).

        u8 x u8, not u8 x s8: on CPUs without VNNI (AVX2-only ones such as AMD Zen 3) ORT's u8 x s8
        GEMM adds pairs of products in int16 with saturation (``vpmaddubsw``; ORT's quantization
        docs name the problem and recommend U8U8), which took a per-token int8 MLP from 0.9994 to
        0.947 cosine against fp32 there; its u8 x u8 kernel widens to int16 first and is exact.
        """
        weight_t, scale, zp = self._int8_columns(layer)
        shifted, zp_u8 = _as_uint8(weight_t, zp, channels=scale.shape[0])
        return shifted, scale, zp_u8

    def _dynamic_matmul(self, activation: str, output: str, layer: _Layer):
        if self.dynamic_activations == "per_tensor":
            return self._dynamic_matmul_per_tensor(activation, output, layer)
        if not layer.module.config.activation_symmetric:
            return self._dynamic_matmul_per_token_asymmetric(activation, output, layer)
        return self._dynamic_matmul_per_token(activation, output, layer)

    def _reduce(self, op: str, source: str, result: str, stem: str):
        """``op`` (ReduceMax / ReduceMin) over the last axis, keeping it, at this opset."""
        import onnx.helper as oh

        inputs, attrs = [source], {"keepdims": 1}
        if self.opset >= 18:  # the axes are an input from opset 18 on
            inputs.append(self._add(np.array([-1], dtype=np.int64), stem + ".axes"))
        else:
            attrs["axes"] = [-1]
        return oh.make_node(op, inputs, [result], name=self._name(f"{stem}_{op}"), **attrs)

    def _dynamic_matmul_per_token_asymmetric(self, activation: str, output: str, layer: _Layer):
        """Asymmetric per-token int8 (``modules.kernels.quantize_per_token_asymmetric``) in plain
        ops: each row's ``[min(x, 0), max(x, 0)]`` on 256 levels, ``s = (max - min) / 255``,
        uint8 codes ``u = clip(round(x / s) + z, 0, 255)`` with the row's zero point
        ``z = round(-min / s)``. ORT's MatMulInteger takes one activation zero point per tensor,
        so the product runs with none and the zero points' share comes off after it, as in our
        kernels: ``y = s * (u @ W - z * sum_k W) * w_scale`` (``sum_k W``: the weight codes'
        column sums, an initializer)."""
        import onnx.helper as oh
        from onnx import TensorProto

        weight_t, scale, zp = self._uint8_columns(layer)
        # the product's weight is the uint8 codes less their zero point: the int8 codes less theirs
        sums = weight_t.astype(np.int64).sum(axis=0) - weight_t.shape[0] * zp.astype(np.int64)
        stem = layer.name
        keys = ("min", "max", "low", "high", "span", "span_safe", "a_scale", "neg_low", "zp_ratio", "a_zp")
        keys += ("ratio", "rounded", "shifted", "clipped", "a_q", "int32", "float", "share", "centered", "scaled")
        n = {key: self._name(f"{stem}.{key}") for key in keys}
        f32 = np.float32

        def const(value, suffix):
            return self._add(np.array(value, dtype=f32), f"{stem}.{suffix}")

        def node(op, inputs, out, suffix, **attrs):
            return oh.make_node(op, inputs, [out], name=self._name(f"{stem}_{suffix}"), **attrs)

        zero = const(0.0, "zero")
        mm_inputs = [n["a_q"], self._add(weight_t, stem + ".qweight")]
        mm_inputs += [
            self._add(np.array(0, dtype=np.uint8), stem + ".a_zero_point"),
            self._add(zp, stem + ".zero_point"),
        ]
        return [
            self._reduce("ReduceMin", activation, n["min"], stem),
            self._reduce("ReduceMax", activation, n["max"], stem),
            node("Min", [n["min"], zero], n["low"], "low"),
            node("Max", [n["max"], zero], n["high"], "high"),
            node("Sub", [n["high"], n["low"]], n["span"], "span"),
            node("Max", [n["span"], const(1e-12, "eps")], n["span_safe"], "eps"),
            node("Div", [n["span_safe"], const(255.0, "levels")], n["a_scale"], "a_scale"),
            node("Neg", [n["low"]], n["neg_low"], "neg_low"),
            node("Div", [n["neg_low"], n["a_scale"]], n["zp_ratio"], "zp_ratio"),
            node("Round", [n["zp_ratio"]], n["a_zp"], "a_zp"),
            node("Div", [activation, n["a_scale"]], n["ratio"], "div"),
            node("Round", [n["ratio"]], n["rounded"], "round"),
            node("Add", [n["rounded"], n["a_zp"]], n["shifted"], "shift"),
            node("Clip", [n["shifted"], zero, const(255.0, "hi")], n["clipped"], "clip"),
            node("Cast", [n["clipped"]], n["a_q"], "q", to=TensorProto.UINT8),
            node("MatMulInteger", mm_inputs, n["int32"], "MatMulInteger"),
            node("Cast", [n["int32"]], n["float"], "f", to=TensorProto.FLOAT),
            node("Mul", [n["a_zp"], self._add(sums.astype(f32), stem + ".code_sums")], n["share"], "share"),
            node("Sub", [n["float"], n["share"]], n["centered"], "centered"),
            node("Mul", [n["centered"], n["a_scale"]], n["scaled"], "sa"),
            node("Mul", [n["scaled"], self._add(scale, stem + ".scale")], output, "sw"),
        ]

    def _dynamic_matmul_per_token(self, activation: str, output: str, layer: _Layer):
        """Our numerics in plain ops: per-row symmetric int8 ``x_q = round(x / s)``,
        ``s = max(|x|) / 127`` (as ``modules.kernels.quantize_per_token``), then MatMulInteger
        and both scales. No ORT fusion exists for per-row scales, so MatMulInteger runs as such
        (still an integer GEMM). The codes go in shifted to uint8 (``x_q + 128``, zero point
        128: the same integers): ORT's CPU GEMM has a fast u8 x s8 path, s8 x s8 measured 5x
        slower (MiniLM, ORT 1.32)."""
        import onnx.helper as oh
        from onnx import TensorProto

        weight_t, scale, zp = self._uint8_columns(layer)
        stem = layer.name
        names = {
            key: self._name(f"{stem}.{key}")
            for key in ("abs", "amax", "amax_safe", "a_scale", "ratio", "rounded", "shifted", "clipped", "a_q")
        }
        names.update({key: self._name(f"{stem}.{key}") for key in ("int32", "float", "scaled")})
        f32 = np.float32
        mm_inputs = [names["a_q"], self._add(weight_t, stem + ".qweight")]
        mm_inputs.append(self._add(np.array(128, dtype=np.uint8), stem + ".a_zero_point"))
        mm_inputs.append(self._add(zp, stem + ".zero_point"))
        return [
            oh.make_node("Abs", [activation], [names["abs"]], name=self._name(stem + "_abs")),
            self._reduce("ReduceMax", names["abs"], names["amax"], stem),
            oh.make_node(
                "Max",
                [names["amax"], self._add(np.array(1e-12, dtype=f32), stem + ".eps")],
                [names["amax_safe"]],
                name=self._name(stem + "_eps"),
            ),
            oh.make_node(
                "Div",
                [names["amax_safe"], self._add(np.array(127.0, dtype=f32), stem + ".qmax")],
                [names["a_scale"]],
                name=self._name(stem + "_a_scale"),
            ),
            oh.make_node("Div", [activation, names["a_scale"]], [names["ratio"]], name=self._name(stem + "_div")),
            oh.make_node("Round", [names["ratio"]], [names["rounded"]], name=self._name(stem + "_round")),
            oh.make_node(
                "Add",
                [names["rounded"], self._add(np.array(128.0, dtype=f32), stem + ".offset")],
                [names["shifted"]],
                name=self._name(stem + "_shift"),
            ),
            oh.make_node(  # [-127, 127] + 128
                "Clip",
                [
                    names["shifted"],
                    self._add(np.array(1.0, dtype=f32), stem + ".lo"),
                    self._add(np.array(255.0, dtype=f32), stem + ".hi"),
                ],
                [names["clipped"]],
                name=self._name(stem + "_clip"),
            ),
            oh.make_node(
                "Cast", [names["clipped"]], [names["a_q"]], to=TensorProto.UINT8, name=self._name(stem + "_q")
            ),
            oh.make_node("MatMulInteger", mm_inputs, [names["int32"]], name=self._name(stem + "_MatMulInteger")),
            oh.make_node(
                "Cast", [names["int32"]], [names["float"]], to=TensorProto.FLOAT, name=self._name(stem + "_f")
            ),
            oh.make_node("Mul", [names["float"], names["a_scale"]], [names["scaled"]], name=self._name(stem + "_sa")),
            oh.make_node(
                "Mul", [names["scaled"], self._add(scale, stem + ".scale")], [output], name=self._name(stem + "_sw")
            ),
        ]

    def _dynamic_matmul_per_tensor(self, activation: str, output: str, layer: _Layer):
        """ORT's own dynamic mode (``quantize_dynamic``'s graph: one uint8 scale per tensor),
        which ORT fuses into DynamicQuantizeMatMul: faster, coarser than our per-token grid."""
        import onnx.helper as oh
        from onnx import TensorProto

        weight_t, scale, zp = self._uint8_columns(layer)
        stem = layer.name
        a_q, a_scale, a_zp = self._name(stem + ".a_q"), self._name(stem + ".a_scale"), self._name(stem + ".a_zp")
        product, as_float, scales = self._name(stem + ".int32"), self._name(stem + ".float"), self._name(stem + ".s")
        mm_inputs = [a_q, self._add(weight_t, stem + ".qweight"), a_zp, self._add(zp, stem + ".zero_point")]
        return [
            oh.make_node("DynamicQuantizeLinear", [activation], [a_q, a_scale, a_zp], name=self._name(stem + "_dql")),
            oh.make_node("MatMulInteger", mm_inputs, [product], name=self._name(stem + "_MatMulInteger")),
            oh.make_node("Cast", [product], [as_float], to=TensorProto.FLOAT, name=self._name(stem + "_cast")),
            oh.make_node(
                "Mul", [a_scale, self._add(scale, stem + ".scale")], [scales], name=self._name(stem + "_scales")
            ),
            oh.make_node("Mul", [as_float, scales], [output], name=self._name(stem + "_rescale")),
        ]

    def _static_input(self, activation: str, layer: _Layer):
        """QuantizeLinear -> DequantizeLinear with the calibrated per-tensor int8 qparams, as uint8
        codes with the zero point shifted by 128 (the same integers; see :meth:`_uint8_columns`)."""
        import onnx.helper as oh

        module = layer.module
        scale = module.input_scale.detach().float().reshape(()).cpu().numpy()
        zp = (module.input_zero_point.detach().cpu().to(torch.int16).reshape(()) + 128).to(torch.uint8).numpy()
        s, z = self._add(scale, layer.name + ".input_scale"), self._add(zp, layer.name + ".input_zero_point")
        quantized, restored = self._name(layer.name + ".x_q"), self._name(layer.name + ".x_dq")
        nodes = [
            oh.make_node("QuantizeLinear", [activation, s, z], [quantized], name=self._name(layer.name + "_q")),
            oh.make_node("DequantizeLinear", [quantized, s, z], [restored], name=self._name(layer.name + "_dq")),
        ]
        return nodes, restored

    def _dequantized_weight(self, layer: _Layer, weight: np.ndarray, scale, zp, axis: int):
        import onnx.helper as oh

        inputs = [self._add(weight, layer.name + ".qweight"), self._add(scale, layer.name + ".scale")]
        if zp is not None:
            inputs.append(self._add(zp, layer.name + ".zero_point"))
        out = self._name(layer.name + ".weight_dq")
        node = oh.make_node("DequantizeLinear", inputs, [out], axis=axis, name=self._name(layer.name + "_w_dq"))
        return node, out

    def _static_matmul(self, activation: str, output: str, layer: _Layer):
        """QuantizeLinear (calibrated per-tensor int8) -> com.microsoft.MatMulIntegerToFloat.

        That is what ORT's QDQ fusion makes of DQ(x), DQ(W) -> MatMul, written directly:
        left to the fusion, a 2-D MatMul + float bias is first fused into a float Gemm
        (MatMulAddFusion) and the integer kernel is lost (measured on ORT 1.32)."""
        import onnx.helper as oh

        weight_t, scale, zp = self._uint8_columns(layer)
        module = layer.module
        x_scale = self._add(module.input_scale.detach().float().reshape(()).cpu().numpy(), layer.name + ".input_scale")
        # uint8 codes with the zero point shifted by 128 (the same integers): ORT's u8 x s8 GEMM
        # is the fast one on the CPU (see _dynamic_matmul_per_token)
        shifted_zp = module.input_zero_point.detach().cpu().to(torch.int16).reshape(()) + 128
        x_zp = self._add(shifted_zp.to(torch.uint8).numpy(), layer.name + ".input_zero_point_u8")
        quantized = self._name(layer.name + ".x_q")
        inputs = [
            quantized,
            self._add(weight_t, layer.name + ".qweight"),
            x_scale,
            self._add(scale, layer.name + ".scale"),
        ]
        inputs.append(x_zp)
        inputs.append(self._add(zp, layer.name + ".zero_point"))
        return [
            oh.make_node(
                "QuantizeLinear", [activation, x_scale, x_zp], [quantized], name=self._name(layer.name + "_q")
            ),
            oh.make_node(
                "MatMulIntegerToFloat",
                inputs,
                [output],
                domain=_MS_DOMAIN,
                name=self._name(layer.name + "_MatMulIntegerToFloat"),
            ),
        ]

    # -- Embedding / Conv -----------------------------------------------------------------
    def _embedding(self, node, layer: _Layer):
        import onnx.helper as oh

        if self._weight_input(node, layer, transposed=False) != 0:
            return None
        qt = _host_weight(layer.module)
        if qt.zero_point is not None and qt.zero_point.is_floating_point():
            raise ConfigurationError(
                f"embedding {layer.name!r} has float zero points, which DequantizeLinear cannot take",
                suggestion="Keep embeddings on the default int8 grid.",
            )
        weight = qt.qdata.to(torch.int8).numpy()
        zp = None if qt.zero_point is None else qt.zero_point.to(torch.int8).reshape(-1).numpy()
        w_node, w_out = self._dequantized_weight(layer, weight, qt.scale.float().reshape(-1).numpy(), zp, axis=0)
        gather = oh.make_node("Gather", [w_out, *node.input[1:]], list(node.output), name=node.name)
        gather.attribute.extend(node.attribute)
        return [w_node, gather]

    def _conv(self, node, layer: _Layer):
        import onnx.helper as oh

        if self._weight_input(node, layer, transposed=False) != 1:
            return None
        qt = _host_weight(layer.module)
        weight = qt.qdata.to(torch.int8).numpy()
        zp = None if qt.zero_point is None else qt.zero_point.to(torch.int8).reshape(-1).numpy()
        nodes = []
        activation = node.input[0]
        if layer.module.config.activation == "static":
            # ORT fuses Q/DQ activations and DQ weights into QLinearConv: uint8 on both sides, the
            # integer kernel that is exact without VNNI (see _uint8_columns)
            nodes, activation = self._static_input(activation, layer)
            weight, zp = _as_uint8(weight, zp, channels=weight.shape[0])
        w_node, w_out = self._dequantized_weight(layer, weight, qt.scale.float().reshape(-1).numpy(), zp, axis=0)
        conv = oh.make_node("Conv", [activation, w_out, *node.input[2:]], list(node.output), name=node.name)
        conv.attribute.extend(node.attribute)
        return [*nodes, w_node, conv]


def _as_uint8(codes: np.ndarray, zero_point: np.ndarray | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and per-channel zero points (None: 0) shifted by 128 into uint8: the same integers."""
    shifted = (codes.view(np.uint8) ^ np.uint8(0x80)).astype(np.uint8)
    if zero_point is None:
        return shifted, np.full(channels, 128, dtype=np.uint8)
    return shifted, (zero_point.astype(np.int16) + 128).astype(np.uint8)


# -- the consumer -----------------------------------------------------------------------------
def onnxruntime_session(path: str | os.PathLike, *, optimized_model_filepath: str | os.PathLike | None = None):
    """An ``onnxruntime.InferenceSession`` (CPU) for an exported file, with the options it is
    tested with: full graph optimization, and ``session.qdq_matmulnbits_accuracy_level=0`` so
    that ORT never turns a DequantizeLinear -> MatMul into a MatMulNBits with int8 activations
    (its default level 4) behind our back. ``optimized_model_filepath`` writes the graph ORT
    actually runs (see :func:`optimized_op_types`).

    Example:
        >>> session = onnxruntime_session("model.onnx")                 # doctest: +SKIP
        >>> out = session.run(None, {"input_ids": ids.numpy()})          # doctest: +SKIP
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_op_types(path: str | os.PathLike, workdir: str | os.PathLike) -> set[str]:
    """Op types of the graph ONNX Runtime runs for ``path`` after its fusions (written to
    ``workdir``); intersect with :data:`INTEGER_KERNELS` to see the integer kernels.

    Example:
        >>> INTEGER_KERNELS & optimized_op_types("model.onnx", tmp_dir)  # doctest: +SKIP
        {'MatMulNBits'}
    """
    import onnx

    target = Path(workdir) / (Path(path).stem + ".optimized.onnx")
    onnxruntime_session(path, optimized_model_filepath=target)
    return {node.op_type for node in onnx.load(str(target), load_external_data=False).graph.node}


FORMAT = ExportFormat(
    name="onnx",
    artifact_name="model.onnx",
    consumers="ONNX Runtime >= 1.20 (CPU: MatMulNBits, DynamicQuantizeMatMul, QDQ int8)",
    check=check,
    export=export_onnx,
)
