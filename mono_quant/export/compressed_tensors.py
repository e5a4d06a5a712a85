"""Export to compressed-tensors: the Hugging Face folder vLLM and transformers load.

``result.save("out_dir", format="compressed-tensors", tokenizer=tok)`` writes ``config.json``
(the model's config plus a ``quantization_config`` with ``quant_method: compressed-tensors``),
``model.safetensors``, the tokenizer files and ``generation_config.json`` when the model has
one. Load it with ``AutoModelForCausalLM.from_pretrained(out_dir)`` (or ``AutoModel``) or
``vllm serve out_dir``.

What each quantized layer becomes (the layouts of compressed-tensors' own compressors,
``compressed_tensors/compressors/naive_quantized/base.py`` (``int-quantized``) and
``pack_quantized/base.py`` + ``helpers.py`` (``pack-quantized``, ``pack_to_int32``), 0.20):

* W8A8 (int8 weights per channel, activations int8 per token at run time, or per tensor from
  calibration): ``int-quantized``; ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``;
  static adds ``input_scale`` ``[1]`` and, when asymmetric, ``input_zero_point`` int8 ``[1]``;
  dynamic declares ``symmetric`` as the layer's per-token grid (asymmetric: each token's zero
  point, computed by the consumer as we do: ``calculate_qparams``; vLLM's "azp" int8 kernels).
* W4A16 (int4 groups) and W8A16 (int8 weight-only): ``pack-quantized``; ``weight_packed`` int32
  (each value + 2^(bits-1), 32 / bits values per word, the first in the lowest bits),
  ``weight_scale`` ``[out, in / group]`` (``[out, 1]`` per channel), ``weight_shape`` and, when
  asymmetric, ``weight_zero_point`` int32 packed the same way along the *output* dimension.
  Zero points are signed in this format (int4 in [-8, 7]): mono_quant's unsigned int4 values
  and zero points are shifted by 8, which leaves ``(q - zp) * scale`` unchanged.
* A partial last group (``in_features % group_size != 0``) is written exactly with a smaller
  group: the largest power of two dividing both (576 features in groups of 128 -> groups of
  64, each scale repeated), because compressed-tensors needs the group to divide the row.
* Embeddings (compressed-tensors quantizes only Linear layers) are written in float, as their
  dequantized weights: the same numbers mono_quant computes with.
* A quantized output head (``lm_head``) is written quantized, in a config group that names it
  (vLLM quantizes a head only when a target names it, since vLLM #37291; older vLLM and SGLang
  before their fix serve garbage from a quantized head). ``export(..., float_head=True)`` writes it
  in float instead (dequantized: the same weights, but its activations are then not quantized).
  A head compressed-tensors cannot run quantized (asymmetric int8), and the 8-bit head of an
  int4 run (a scheme of its own trips consumers), are written in float, tied again to the
  embedding when equal. Float Linears are listed in ``ignore``. A tied head that is quantized, or whose float
  weight differs from the embedding's, is written untied (``tie_word_embeddings: false``).
* Scales are stored in fp32, so an fp32 load decompresses to exactly mono_quant's weights.
* Mixed precision (``layer_overrides``, ``max_accuracy_loss``): one config group per distinct
  scheme (W4A16 per group size, W8A16, W8A8...), each listing its layers as anchored ``re:``
  targets of their exact names (``exact_target``), float and fp16 / bf16 layers in ``ignore``;
  ``format`` is ``mixed-precision`` when the groups' formats differ. transformers 5.24 loads
  such a folder through its default (compressed) path, which resolves each layer's group; its
  ``dequantize=True`` path applies one group's scheme to every layer (wrong weights, or a
  refusal). Several schemes with asymmetric int4 load in vLLM but in neither transformers path
  (the compressed path also mis-sizes packed zero points): the export warns.

What it refuses (ConfigurationError, before writing anything): fp16/bf16 casts, state_dict
results, asymmetric int8 weights (vLLM's int8 kernels take symmetric weights only), int4 with
quantized activations, quantized layers other than Linear / Embedding, float zero points (HQQ),
SmoothQuant input scales that could not be folded (``smoothed_input``), and
fused projections (q/k/v, gate/up) quantized with different schemes or one of them float (vLLM
runs each fused group as one matrix; ``check`` finds them in the layer configs).

Example:
    >>> result = mono_quant.quantize(model, bits=4, group_size=128)           # doctest: +SKIP
    >>> result.save("smollm2-w4a16", format="compressed-tensors", tokenizer=tok)  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("smollm2-w4a16")                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.errors import ConfigurationError
from mono_quant.export import ExportFormat, check_facts

__all__ = ["FORMAT", "check", "export", "pack_to_int32", "expand_group_qparams", "exact_target"]

_SUPPORTED = (
    "int8 dynamic (W8A8, activations per token), int8 static (W8A8, per-tensor activations), "
    "int8 weight-only (W8A16) with symmetric weights, and int4 weight-only (W4A16, symmetric or asymmetric)"
)
# vLLM fuses these sibling projections into one matrix: they must share one scheme.
_FUSED_GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)
_HEAD_NAMES = ("lm_head",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


# -- check -----------------------------------------------------------------------------------
def check(info: Any = None, /, **facts: Any) -> None:
    """Raise ConfigurationError when compressed-tensors cannot represent the quantization.

    ``info`` is the run's QuantizationInfo, or a dict (or keywords) with ``mode``
    ("dynamic" | "weight_only" | "static" | "cast"), ``bits``, ``symmetric`` and optionally
    ``group_size`` / ``layer_configs``, or a QuantizeOptions, so a service can refuse a request
    before quantizing.

    Example:
        >>> check(mode="weight_only", bits=4, symmetric=False, group_size=128)
        >>> check(mode="cast", bits=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigurationError: compressed-tensors export cannot represent mode 'cast' ...
    """
    f = check_facts(info, facts)
    mode, bits, symmetric = f.get("mode"), f.get("bits"), f.get("symmetric", True)
    if mode is not None and str(mode).startswith("state_dict"):
        raise ConfigurationError(
            f"compressed-tensors export needs the quantized nn.Module, but this run quantized a state_dict "
            f"(mode {mode!r}): the folder needs the model's config and layer structure",
            suggestion="Quantize the transformers model object (quantize(model, ...)), then save it.",
        )
    if mode == "cast" or bits == 16:
        raise ConfigurationError(
            f"compressed-tensors export cannot represent mode {mode!r} (bits={bits}): the format stores integer "
            "weights, and an fp16/bf16 model is a plain Hugging Face checkpoint",
            suggestion=f"Use one of: {_SUPPORTED}; or save an fp16 model with model.save_pretrained().",
        )
    if mode not in (None, "dynamic", "weight_only", "static"):
        raise ConfigurationError(
            f"compressed-tensors export cannot represent mode {mode!r}", suggestion=f"Use one of: {_SUPPORTED}."
        )
    if bits == 8 and symmetric is False:
        raise ConfigurationError(
            "compressed-tensors export refuses asymmetric int8 weights: vLLM's int8 kernels (W8A8 and W8A16) "
            "take symmetric weights only, so the folder would not serve",
            suggestion="Quantize with scheme='symmetric' (the int8 default), or use bits=4 for asymmetric weights.",
        )
    if bits == 4 and mode in ("dynamic", "static"):
        raise ConfigurationError(
            f"compressed-tensors export cannot represent int4 weights with {mode} int8 activations",
            suggestion="int4 is weight-only (W4A16): quantize with bits=4 and no activation quantization.",
        )
    layer_configs = f.get("layer_configs") or {}
    for name, layer in layer_configs.items():
        if name.rpartition(".")[2] not in _HEAD_NAMES:  # a head it cannot hold is written in float
            _check_layer(name, layer)
    # Mixed precision: every scheme is a config group of its own, but fused siblings must agree.
    signatures: dict[str, Any] = {name: None for name in f.get("skipped_layers") or ()}
    for name, layer in layer_configs.items():
        signatures[name] = _config_signature(layer)
    _check_fused(signatures)


def _config_signature(layer: Mapping[str, Any]) -> dict[str, Any] | None:
    """What decides a Linear's compressed-tensors scheme, from its layer config (None: written in float)."""
    if layer.get("kind") != "QuantizedLinear":
        return None
    activation = layer.get("activation", "none")
    signature = {"bits": layer.get("bits"), "symmetric": layer.get("symmetric"), "activation": activation}
    if layer.get("bits") == 4:
        signature["group_size"] = layer.get("group_size")
    elif layer.get("per_channel") is False:
        signature["per_channel"] = False
    if activation in ("static", "dynamic"):
        signature["activation_symmetric"] = bool(layer.get("activation_symmetric"))
    return signature


def _check_layer(name: str, layer: Mapping[str, Any]) -> None:
    kind = layer.get("kind")
    if kind in (None, "cast", "QuantizedEmbedding"):
        return  # embeddings are written dequantized
    if kind != "QuantizedLinear":
        raise ConfigurationError(
            f"compressed-tensors export cannot represent layer {name!r} ({kind}): the format quantizes "
            "Linear layers only",
            suggestion=f"Exclude it from quantization (exclude=[{name!r}]) or layer_types=['linear', 'embedding'].",
        )
    bits, symmetric, activation = layer.get("bits"), layer.get("symmetric"), layer.get("activation", "none")
    if layer.get("smoothed_input"):
        raise ConfigurationError(
            f"layer {name!r} divides its input by a SmoothQuant scale that could not be folded into the layer "
            "before it; compressed-tensors has no per-channel input scale, so the folder would compute differently",
            suggestion="Quantize with smoothing_folded_only=True (smoothing where it folds into the layer before) or "
            "smoothing=0 for this export (int8 with activations smooths by default: dynamic from the calibration "
            "data or random tokens, static from its calibration data; `monoquant quantize --format "
            "compressed-tensors` and the service's export_formats set the first themselves), or export to ONNX / "
            "mono_quant's own format.",
        )
    if layer.get("float_zero_point"):
        raise ConfigurationError(
            f"layer {name!r} has float zero points (method='hqq', int4's default for models with a token "
            "embedding), which compressed-tensors cannot store: its zero points are integers on the weight grid",
            suggestion="Quantize with method='rtn' (or 'gptq' with calibration data) for this export "
            "(`monoquant quantize --format compressed-tensors` and the service's export_formats do so themselves), "
            "or export to GGUF (Q4_1 stores a float minimum) / ONNX.",
        )
    if bits == 8 and symmetric is False:
        raise ConfigurationError(
            f"layer {name!r} has asymmetric int8 weights, which vLLM's int8 kernels cannot run",
            suggestion="Quantize int8 layers with scheme='symmetric' (the int8 default).",
        )
    if bits == 4 and activation != "none":
        raise ConfigurationError(
            f"layer {name!r} is int4 with {activation} activations: compressed-tensors has no int W4A8 scheme",
            suggestion="Quantize int4 layers weight-only.",
        )


# -- packing (the layout of compressed_tensors' pack_to_int32, for 4 and 8 bits) ---------------
def pack_to_int32(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values ``[rows, cols]`` (0 .. 2^bits - 1) into int32 words along
    the last axis: ``32 // bits`` values per word, the first in the lowest bits, the last word
    zero-padded. This is compressed-tensors' ``pack_to_int32`` after its own ``+ 2^(bits-1)``
    offset, so pass signed values + 2^(bits-1) (mono_quant's unsigned int4 already is).

    Example:
        >>> pack_to_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)
        tensor([[-2023406815]], dtype=torch.int32)
    """
    if bits not in (4, 8):
        raise ConfigurationError(f"int32 packing supports 4 or 8 bits, got {bits}", suggestion="Use 4 or 8.")
    per_word = 32 // bits
    values = unsigned.to(torch.int64)
    rows, cols = values.shape
    padded = math.ceil(cols / per_word) * per_word
    if padded != cols:
        values = torch.nn.functional.pad(values, (0, padded - cols))
    values = values.view(rows, padded // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (values << shifts).sum(dim=-1)
    # The sum is an unsigned 32-bit pattern: reinterpret it as the int32 the format stores.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def expand_group_qparams(qparam: torch.Tensor, in_features: int, group_size: int) -> tuple[torch.Tensor, int]:
    """``(qparam', group')``: per-group scales / zero points ``[rows, ceil(K / g)]``, possibly
    with a partial last group, rewritten for the largest group ``g'`` dividing ``K``
    (``g' = gcd(g, K)``, a power of two): each value repeated once per ``g'`` columns it covers.
    The dequantized weight is unchanged.

    Example:
        >>> expand_group_qparams(torch.tensor([[1.0, 2.0, 3.0]]), 320, 128)
        (tensor([[1., 1., 2., 2., 3.]]), 64)
    """
    groups = math.ceil(in_features / group_size)
    if qparam.shape[-1] != groups:
        raise ConfigurationError(
            f"qparams have {qparam.shape[-1]} groups, but {in_features} features in groups of {group_size} "
            f"make {groups}",
            suggestion="Export the model quantize() returned, without changing its tensors.",
        )
    if in_features % group_size == 0:
        return qparam, group_size
    new_group = math.gcd(group_size, in_features)
    last = in_features - (groups - 1) * group_size
    repeats = torch.full((groups,), group_size // new_group, dtype=torch.long, device=qparam.device)
    repeats[-1] = last // new_group
    return torch.repeat_interleave(qparam, repeats, dim=-1), new_group


def _dequantize_any(qt) -> torch.Tensor:
    """``(q - zp) * scale`` for a QuantizedTensor, also with a partial last group."""
    q = qt.qdata.to(torch.float32)
    scale, zp = qt.scale.float(), qt.zero_point
    group = getattr(qt.granularity, "group_size", None)
    if scale.dim() == 2 and group:
        scale, _ = expand_group_qparams(scale, q.shape[-1], group)
        if zp is not None:
            zp, _ = expand_group_qparams(zp, q.shape[-1], group)
        per = q.shape[-1] // scale.shape[-1]
        scale = scale.repeat_interleave(per, dim=-1)
        zp = None if zp is None else zp.repeat_interleave(per, dim=-1)
    else:
        scale = scale.reshape(-1, *([1] * (q.dim() - 1)))
        zp = None if zp is None else zp.reshape(-1, *([1] * (q.dim() - 1)))
    if zp is not None:
        q = q - zp.to(torch.float32)
    return q * scale


# -- the layers --------------------------------------------------------------------------------
def _scheme_of(name: str, layer) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(scheme, tensors)`` of one QuantizedLinear: its compressed-tensors scheme (weights,
    input_activations, format) and the tensors the format stores under its prefix."""
    config = layer.config
    qt = layer.quantized_weight()
    if qt.zero_point is not None and qt.zero_point.is_floating_point():
        raise ConfigurationError(
            f"layer {name!r} has float zero points (e.g. HQQ), which compressed-tensors cannot store: its zero "
            "points are integers on the weight grid",
            suggestion="Export to GGUF (Q4_1 stores a float minimum), or quantize with method='rtn' (or 'gptq').",
        )
    _check_layer(name, {"kind": "QuantizedLinear", **config.to_dict()})
    out_features, in_features = qt.qdata.shape
    bits = qt.spec.bits
    offset = 1 << (bits - 1)
    # Signed values on compressed-tensors' grid: int8 as is; unsigned int4 (and its zero point) - 8.
    signed = qt.qdata.to(torch.int32) - (8 if bits == 4 else 0)
    signed_zp = None if qt.zero_point is None else qt.zero_point.to(torch.int32) - (8 if bits == 4 else 0)
    if qt.spec.symmetric:
        if signed_zp is not None and bool(signed_zp.any()):
            raise ConfigurationError(
                f"layer {name!r} is symmetric int{bits} but its zero points are not the grid's fixed middle",
                suggestion="Export the model quantize() returned, without changing its tensors.",
            )
        signed_zp = None  # symmetric int4's zero point is the grid's fixed 8 (0 once signed)
    scale = qt.scale.float()
    group = getattr(qt.granularity, "group_size", None)
    if scale.dim() == 2 and group:
        scale, group = expand_group_qparams(scale, in_features, group)
        if signed_zp is not None:
            signed_zp, _ = expand_group_qparams(signed_zp, in_features, qt.granularity.group_size)
        strategy = {"strategy": "group", "group_size": int(group)}
    else:
        scale = scale.reshape(out_features, 1)
        signed_zp = None if signed_zp is None else signed_zp.reshape(out_features, 1)
        strategy = {"strategy": "channel"}
    weights = {"num_bits": bits, "type": "int", "symmetric": bool(qt.spec.symmetric), "dynamic": False, **strategy}
    tensors: dict[str, torch.Tensor] = {"weight_scale": scale.contiguous()}
    activation = config.activation
    if activation == "none":
        fmt = "pack-quantized"
        input_activations = None
        tensors["weight_packed"] = pack_to_int32(signed + offset, bits)
        tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64)
        if signed_zp is not None:
            # Packed along the output dimension (packed_dim=0 in compressed-tensors).
            tensors["weight_zero_point"] = pack_to_int32((signed_zp + offset).t().contiguous(), bits).t().contiguous()
    else:
        fmt = "int-quantized"
        tensors["weight"] = signed.to(torch.int8).contiguous()
        # dynamic: per token, symmetric or with each token's zero point (vLLM's W8A8 int8 runs
        # both, the second on its "azp" kernels); static: per tensor, with the calibrated qparams
        dynamic = activation == "dynamic"
        act_symmetric = bool(config.activation_symmetric)
        input_activations = {
            "num_bits": 8,
            "type": "int",
            "symmetric": act_symmetric,
            "dynamic": dynamic,
            "strategy": "token" if dynamic else "tensor",
        }
        if not dynamic:
            tensors["input_scale"] = layer.input_scale.detach().float().reshape(1).clone()
            if not act_symmetric:
                tensors["input_zero_point"] = layer.input_zero_point.detach().to(torch.int8).reshape(1).clone()
    scheme = {"weights": weights, "input_activations": input_activations, "output_activations": None, "format": fmt}
    return scheme, tensors


def _head_unrepresentable(name: str, layer) -> str | None:
    """Why compressed-tensors cannot hold the head quantized, or None when it can."""
    zero_point = layer.quantized_weight().zero_point
    if zero_point is not None and zero_point.is_floating_point():
        return "float zero points"
    try:
        _check_layer(name, {"kind": "QuantizedLinear", **layer.config.to_dict()})
    except ConfigurationError as exc:
        return exc.message
    return None


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model keeps its float tensors in (fp32 unless it was cast). Layers cast to
    fp16 / bf16 by ``layer_overrides`` do not count: their values are written exactly in it."""
    from mono_quant.core.quantizers import is_cast_layer

    for module in model.modules():
        if is_cast_layer(module):
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.device.type != "meta":
                return tensor.dtype
    return torch.float32


def exact_target(name: str) -> str:
    r"""A compressed-tensors target matching the module ``name`` only (``re:`` + anchored regex).

    Example:
        >>> exact_target("model.layers.0.mlp.down_proj")
        're:^model\\.layers\\.0\\.mlp\\.down_proj$'
    """
    return f"re:^{re.escape(name)}$"


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    from mono_quant.modules import QuantizedModule

    if isinstance(module, QuantizedModule):
        return _dequantize_any(module.quantized_weight())
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach()


def _check_fused(signatures: Mapping[str, Any]) -> None:
    """Refuse fused sibling projections (q/k/v, gate/up) with different schemes. ``signatures``
    maps a Linear's name to what decides its scheme (a scheme, or a config signature), None
    for a Linear written in float."""
    for group in _FUSED_GROUPS:
        parents: dict[str, dict[str, Any]] = {}
        for name in sorted(signatures):
            parent, _, leaf = name.rpartition(".")
            if leaf in group:
                parents.setdefault(parent, {})[leaf] = json.dumps(signatures[name], sort_keys=True)
        for parent, members in parents.items():
            if len(set(members.values())) > 1:
                described = ", ".join(f"{leaf}: {json.loads(s) or 'float'}" for leaf, s in sorted(members.items()))
                raise ConfigurationError(
                    f"the fused projections under {parent or 'the model'!r} are quantized differently ({described}); "
                    "vLLM runs them as one matrix with one scheme",
                    suggestion="Quantize all of " + "/".join(group) + " alike (same include/exclude, group size and "
                    "layer_overrides precision, e.g. '*.self_attn.[qkv]_proj=int4-g32').",
                )


# -- the folder --------------------------------------------------------------------------------
def _save_tokenizer(tokenizer: Any, model: nn.Module, out: Path) -> None:
    source = tokenizer
    if source is None:
        # A model loaded from a Hugging Face folder remembers it: take its tokenizer files.
        source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source or not Path(str(source)).is_dir():
            return
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(str(out))
        return
    folder = Path(os.fspath(source))
    if not folder.is_dir():
        raise ConfigurationError(
            f"tokenizer={tokenizer!r} is neither a tokenizer object nor a folder",
            suggestion="Pass the transformers tokenizer (AutoTokenizer.from_pretrained(...)) or its folder.",
        )
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    original: Any = None,
    info: Any = None,
    tokenizer: Any = None,
    sample_inputs: Any = None,
    float_head: bool = False,
) -> Path:
    """Write ``model`` (quantized by mono_quant) to the Hugging Face folder ``path``.

    ``tokenizer`` (a transformers tokenizer or a folder) is saved with it; without one, the
    tokenizer files of the folder the model was loaded from are copied when there is one.
    ``float_head=True`` writes a quantized output head in float (for servers that cannot run a
    quantized head). Returns the folder.

    Example:
        >>> export(result.model, "out_dir", tokenizer=tok)  # doctest: +SKIP
        PosixPath('out_dir')
    """
    from safetensors.torch import save_file

    from mono_quant.modules import QuantizedEmbedding, QuantizedLinear, QuantizedModule

    del original, sample_inputs  # not needed: the folder is built from the quantized model itself
    if info is not None:
        check(info)
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ConfigurationError(
            f"compressed-tensors export needs a transformers model (with .config), got {type(model).__name__}",
            suggestion="Quantize a model loaded with transformers (AutoModel.from_pretrained), then save it.",
        )
    float_dtype = _float_dtype(model)
    output_name = (
        _module_name(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    )
    input_name = _module_name(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None

    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    float_linears: set[str] = set()
    handled: set[str] = set()  # module prefixes whose tensors are written here, not from state_dict
    head_notes: list[str] = []
    # An int4 run keeps its head at 8 bits: a second scheme just for the head trips consumers
    # (transformers' dequantize path cannot load it; vLLM before #37291 serves garbage). Written
    # in float it is tied to the (float) embedding again: the same numbers, no extra bytes.
    int4_run = any(isinstance(m, QuantizedLinear) and m.config.bits == 4 for m in model.modules())
    for name, module in model.named_modules():
        head_reason = None
        if isinstance(module, QuantizedLinear) and name == output_name:
            head_reason = "float_head=True" if float_head else _head_unrepresentable(name, module)
            if head_reason and not float_head:
                head_notes.append(f"{name}: {head_reason}")
            elif head_reason is None and int4_run and module.config.bits == 8:
                head_reason = "an 8-bit head in an int4 run"  # the policy above: no warning
        if isinstance(module, QuantizedLinear) and head_reason is None:
            scheme, layer_tensors = _scheme_of(name, module)
            schemes[name] = scheme
            for key, value in layer_tensors.items():
                tensors[f"{name}.{key}"] = value
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(float_dtype)
            handled.add(name)
        elif isinstance(module, (QuantizedEmbedding, QuantizedLinear)):
            # Written as the float weight the layer computes with (see the module docstring).
            tensors[f"{name}.weight"] = _dequantize_any(module.quantized_weight()).to(float_dtype).contiguous()
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                tensors[f"{name}.bias"] = bias.detach().to(float_dtype)
            if isinstance(module, QuantizedLinear):
                float_linears.add(name)
            handled.add(name)
        elif isinstance(module, QuantizedModule):
            raise ConfigurationError(
                f"compressed-tensors export cannot represent layer {name!r} ({type(module).__name__}): the format "
                "quantizes Linear layers only",
                suggestion=f"Exclude it from quantization (exclude=[{name!r}]).",
            )
        elif isinstance(module, nn.Linear):
            float_linears.add(name)
    if not schemes:
        raise ConfigurationError(
            "compressed-tensors export found no quantized Linear layer to write",
            suggestion="Quantize the model's Linear layers (the default) before exporting.",
        )
    _check_fused({**{name: None for name in float_linears}, **schemes})

    prefixes = tuple(f"{name}." for name in handled)
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or key in tensors:
            continue
        if id(value) in seen:  # shared storage (tied weights) is written once
            continue
        seen[id(value)] = key
        tensors[key] = value.detach().to(float_dtype) if value.is_floating_point() else value.detach()

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    tied = bool(config.get("tie_word_embeddings", False))
    if output_name in schemes and tied:
        config["tie_word_embeddings"] = False  # a quantized head cannot share the float embedding
    elif output_name and input_name and tied:
        out_w, in_w = _float_weight(model.get_submodule(output_name)), _float_weight(model.get_submodule(input_name))
        if out_w is not None and in_w is not None and out_w.shape == in_w.shape and torch.equal(out_w, in_w):
            tensors.pop(f"{output_name}.weight", None)  # transformers ties it back on load
        else:
            config["tie_word_embeddings"] = False  # two different matrices now: write both
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    config["dtype"] = str(float_dtype).replace("torch.", "")
    config.pop("torch_dtype", None)

    names_by_scheme: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        names_by_scheme.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    config_groups = {}
    for index, (key, names) in enumerate(names_by_scheme.items()):
        # One scheme: every Linear not ignored. Several (mixed precision), or a quantized head:
        # each group lists its layers, as anchored "re:" targets of their exact names (servers
        # match a head, not a Linear subclass there, by name only).
        if len(names_by_scheme) == 1 and output_name not in schemes:
            targets = ["Linear"]
        else:
            targets = [exact_target(name) for name in sorted(names)]
        config_groups[f"group_{index}"] = {"targets": targets, **json.loads(key)}
    asymmetric = sorted(
        n for n, sch in schemes.items() if sch["format"] == "pack-quantized" and not sch["weights"]["symmetric"]
    )
    if len(config_groups) > 1 and asymmetric:
        warnings.warn(
            f"compressed-tensors export wrote {len(config_groups)} schemes, some with asymmetric weights "
            f"({asymmetric[0]}...): vLLM serves such a folder, but transformers 5.x cannot load it (its dequantize "
            "path applies one scheme to every layer, its compressed path mis-sizes packed zero points); "
            "quantize with scheme='symmetric' for a folder transformers loads too",
            stacklevel=2,
        )
    formats = {scheme["format"] for scheme in schemes.values()}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }

    if head_notes:
        warnings.warn(
            "compressed-tensors export wrote the output head in float (its dequantized weight): "
            + "; ".join(head_notes),
            stacklevel=2,
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(str(out))
    _save_tokenizer(tokenizer, model, out)
    return out


FORMAT = ExportFormat(
    name="compressed-tensors",
    artifact_name="compressed-tensors.zip",
    consumers="transformers (AutoModel.from_pretrained) and vLLM",
    check=check,
    export=export,
    float_zero_points=False,
    input_scales=False,
    folded_smoothing=True,
)
