"""The mono_quant file format: safetensors with real low-bit tensors and JSON metadata.

A saved file holds every tensor of the quantized model's state_dict (``*.qweight`` int8 or
packed int4, ``*.weight_scale``, ``*.weight_zero_point``, float tensors as they were) and
string metadata (safetensors metadata is ``Dict[str, str]``, so structures are JSON strings):

* ``format`` = "mono_quant", ``format_version`` = "2", ``mono_quant_version``
* ``layers``: JSON ``{layer name: {kind, bits, symmetric, group_size, activation, ...}}``
  (version 2: a dynamic layer's ``activation_symmetric`` is its per-token grid; version 1
  files wrote False there and always ran symmetric per token, which is how they are read)
* ``quantization_info``: JSON of :class:`QuantizationInfo` when known

``load_quantized(path, model)`` rebuilds the quantized layers inside a float skeleton of the
same architecture from ``layers`` and loads the tensors: outputs are bitwise identical.

State dicts (no forward) and files are quantized tensor by tensor: every floating ``*.weight``
of two or more dimensions becomes a layer entry of kind "auto", which ``load_quantized``
turns into the quantized class of whatever layer the skeleton has at that name.
:func:`quantize_file` does this streaming: one tensor in memory at a time, written straight
to the output file, so peak memory is a small fraction of the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.core.options import QuantizeOptions
from mono_quant.core.plan import WEIGHT_TENSOR_NAMES, QuantizationPlan, plan_tensors, weight_layout
from mono_quant.core.progress import Progress
from mono_quant.core.quantizers import (
    QuantizationInfo,
    cast_hooks,
    is_cast_layer,
    set_submodule,
    weight_tensors_for,
)
from mono_quant.core.schemes import QuantizedTensor, dequantize_weight, unpack_int4
from mono_quant.core.scratch import reused_scratch
from mono_quant.errors import InputError
from mono_quant.io.handlers import load_model, read_safetensors_header, sniff_format, torch_load_weights_only
from mono_quant.modules import LayerQuantConfig, QuantizedModule, build_quantized_module, packed_together
from mono_quant.version import __version__

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_model",
    "load_model",
    "read_metadata",
    "load_quantized",
    "layer_metadata",
    "quantize_state_dict",
    "plan_state_dict",
    "tensor_outputs",
    "convert_tensor",
    "quantize_file",
    "dequantized_layer_weight",
]

FORMAT_NAME = "mono_quant"
FORMAT_VERSION = "2"

_TORCH_TO_ST = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}  # fmt: skip
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


def _version() -> str:
    return __version__


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    """``{name: config}`` of every quantized or cast layer in ``model``."""
    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            layers[name] = module.metadata()
        elif is_cast_layer(module):
            # Not module.weight: an LSTM's parameters are weight_ih_l0, ...
            dtype = next(module.parameters()).dtype
            layers[name] = {"kind": "cast", "dtype": str(dtype).replace("torch.", "")}
    return layers


def _file_metadata(layers: dict[str, dict], info: QuantizationInfo | dict | None) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "mono_quant_version": _version(),
        "layers": json.dumps(layers, sort_keys=True),
    }
    if info is not None:
        data = info.to_dict() if isinstance(info, QuantizationInfo) else info
        meta["quantization_info"] = json.dumps(data, default=str, sort_keys=True)
    return meta


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _unshare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with storage shared between entries (tied weights) copied:
    safetensors stores each tensor on its own."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _drop_tied_copies(state_dict: Mapping[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The state_dict without the weight tensors of tied layers (``tied_to`` in their metadata)
    that equal those of the layer they are tied to: a tie is stored once, and
    :func:`load_quantized` restores both sides from it."""
    out = dict(state_dict)
    for layer, entry in layers.items():
        target = entry.get("tied_to")
        if not target:
            continue
        for suffix in WEIGHT_TENSOR_NAMES:
            key, source = f"{layer}.{suffix}", f"{target}.{suffix}"
            if key in out and source in out and torch.equal(out[key].cpu(), out[source].cpu()):
                del out[key]
    return out


def _restore_tied(state_dict: dict[str, torch.Tensor], layers: dict[str, dict]) -> None:
    for layer, entry in layers.items():
        target = entry.get("tied_to")
        for suffix in WEIGHT_TENSOR_NAMES if target else ():
            key, source = f"{layer}.{suffix}", f"{target}.{suffix}"
            if key not in state_dict and source in state_dict:
                state_dict[key] = state_dict[source]


def save_model(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    quantization_info: QuantizationInfo | dict | None = None,
    layers: dict[str, dict] | None = None,
) -> Path:
    """Write a (quantized) model to ``path`` atomically; returns the path.

    ``.safetensors`` (default; any other suffix gets it appended) or ``.pt`` (a
    ``torch.save`` of ``{"state_dict", "mono_quant_metadata"}``, loadable with weights_only).

    Example:
        >>> save_model(result.model, "model.safetensors", result.info)  # doctest: +SKIP
    """
    path = Path(path)
    if isinstance(model, nn.Module):
        state_dict = model.state_dict()
        layers = layer_metadata(model) if layers is None else layers
    elif isinstance(model, Mapping):
        state_dict = model
        layers = layers or {}
    else:
        raise InputError(
            f"save_model needs an nn.Module or a state_dict, got {type(model).__name__}",
            suggestion="Pass result.model from mono_quant.quantize().",
        )
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        path = path.with_name(path.name + ".safetensors")
    metadata = _file_metadata(layers, quantization_info)
    tensors = _unshare(_drop_tied_copies(state_dict, layers))
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save({"state_dict": tensors, "mono_quant_metadata": metadata}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a mono_quant file (``layers`` and ``quantization_info`` as
    structures); an empty ``layers`` for plain files."""
    path = Path(path)
    # By content, not by name: quantize_file (and `monoquant quantize -o x.pt` on a
    # safetensors input) writes safetensors whatever the suffix; .bin files are torch.save.
    if path.is_file() and sniff_format(path) in ("torch_zip", "pickle"):
        obj = torch_load_weights_only(path)  # refusals and corrupt files as InputError
        raw = obj.get("mono_quant_metadata", {}) if isinstance(obj, dict) else {}
    else:
        _, raw = read_safetensors_header(path)
    meta: dict[str, Any] = dict(raw)
    for key in ("layers", "quantization_info"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise InputError(
                    f"{path.name}: metadata field {key!r} is not valid JSON",
                    suggestion="The file was modified or corrupted; quantize the model again.",
                ) from None
    meta.setdefault("layers", {})
    if meta.get("format") == FORMAT_NAME and meta.get("format_version") == "1":
        for config in meta["layers"].values():
            if isinstance(config, dict) and config.get("activation") == "dynamic":
                config["activation_symmetric"] = True  # what version 1 ran, whatever it wrote
    return meta


def load_quantized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Put the quantized layers saved in ``path`` into ``model``, a float skeleton of the
    same architecture (its weights may be random: they are replaced). Returns ``model``, or
    the quantized layer itself when the saved model was a single layer.

    Example:
        >>> skeleton = MyModel()  # doctest: +SKIP
        >>> qmodel = load_quantized("model.safetensors", skeleton)  # doctest: +SKIP
    """
    with packed_together():  # its int8 layers pack side by side on the first forward
        return _load_quantized(path, model)


def _load_quantized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"load_quantized needs the float model to load into, got {type(model).__name__}",
            suggestion="Build the original architecture (e.g. MyModel() or AutoModel.from_config) and pass it.",
        )
    meta = read_metadata(path)
    if meta.get("format") not in (None, FORMAT_NAME):
        raise InputError(
            f"{Path(path).name} has format {meta.get('format')!r}, not {FORMAT_NAME!r}",
            suggestion="Load it with the tool that wrote it.",
        )
    state_dict = load_model(path)
    _restore_tied(state_dict, meta["layers"])
    for name, config in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"the file has a quantized layer {name!r} that the model does not have",
                suggestion="Pass the same architecture the file was quantized from.",
            ) from None
        if config.get("kind") == "cast":
            dtype = getattr(torch, config["dtype"])
            module.to(dtype)
            cast_hooks(module)
            continue
        kind = config.get("kind")
        layer = build_quantized_module(module, LayerQuantConfig.from_dict(config), None if kind == "auto" else kind)
        if name:
            set_submodule(model, name, layer)
        else:  # the whole model is one layer: the quantized layer replaces it
            model = layer
    # Buffers a model does not persist (e.g. transformers' position_ids) may still be in
    # checkpoints written by older versions: they are derived data, not weights.
    non_persistent = {
        f"{prefix}.{buffer}" if prefix else buffer
        for prefix, module in model.named_modules()
        for buffer in module._non_persistent_buffers_set
    }
    state_dict = {k: v for k, v in state_dict.items() if k not in non_persistent}
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"the file does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
            suggestion="Pass the same architecture (and configuration) the file was quantized from.",
        )
    return model.eval()


def dequantized_layer_weight(
    state: Mapping[str, torch.Tensor], layer: str, config: dict, shape: tuple[int, ...] | None = None
) -> torch.Tensor | None:
    """The float weight a saved layer computes with, rebuilt from its stored tensors
    (``qweight``, ``weight_scale``, ``weight_zero_point``, or the cast ``weight``); None when
    ``state`` holds no such tensors for ``layer``. ``shape`` restores the weight's shape."""
    if config.get("kind") == "cast":
        weight = state.get(f"{layer}.weight")
        return None if weight is None else weight.float()
    qweight = state.get(f"{layer}.qweight")
    if qweight is None:
        return None
    cfg = LayerQuantConfig.from_dict(config)
    q = unpack_int4(qweight) if cfg.bits == 4 else qweight
    if shape is not None:
        q = q.reshape(shape)
    zero_point = state.get(f"{layer}.weight_zero_point")
    qt = QuantizedTensor(
        q,
        state[f"{layer}.weight_scale"],
        zero_point if zero_point is None or zero_point.is_floating_point() else zero_point.to(torch.int32),
        cfg.weight_spec,
        cfg.granularity,
    )
    return dequantize_weight(qt)


# -- tensor-by-tensor quantization (state dicts and files) ---------------------------------------
def _layer_of(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _decision_for(plan: QuantizationPlan, name: str, dtype: torch.dtype):
    """The plan's decision that applies to tensor ``name``: its layer's for ``*.weight``; for a
    layer's other float tensors (``*.bias``) only a cast, which casts the whole layer."""
    decision = plan.layers.get(_layer_of(name) or "")
    if decision is not None:
        return decision
    layer = name.rpartition(".")[0]
    decision = plan.layers.get(layer)
    if decision is not None and decision.cast is not None and dtype.is_floating_point:
        return decision
    return None


def tensor_outputs(plan: QuantizationPlan, name: str, shape: tuple, dtype: torch.dtype) -> list[tuple]:
    """``[(name, dtype, shape)]`` a source tensor becomes in the output file (known from the
    header alone, before any data is read)."""
    decision = _decision_for(plan, name, dtype)
    if decision is None or not decision.changes:
        return [(name, dtype, tuple(shape))]
    if decision.cast is not None:
        return [(name, decision.cast, tuple(shape))]
    return [(f"{decision.name}.{t.name}", t.dtype, t.shape) for t in weight_layout(decision.config, tuple(shape))]


def convert_tensor(
    plan: QuantizationPlan, name: str, tensor: torch.Tensor, done: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    """The output tensors of one source tensor, as the plan decides. ``done`` (layer -> its
    quantized tensors) lets a tied layer reuse the tensors of the layer it shares with."""
    decision = _decision_for(plan, name, tensor.dtype)
    if decision is None or not decision.changes:
        return {name: tensor}
    if decision.cast is not None:
        return {name: tensor.to(decision.cast)}
    shared = plan.shared_with(decision.name)
    tensors = done.get(shared) if done is not None and shared else None
    if tensors is None:
        tensors = weight_tensors_for(tensor, decision.config)
    if done is not None:
        done[decision.name] = tensors
    return {f"{decision.name}.{key}": value for key, value in tensors.items()}


def plan_state_dict(state_dict: Mapping[str, torch.Tensor], options: QuantizeOptions) -> QuantizationPlan:
    """The plan for a state_dict: tensors that share storage (tied weights) form tie groups."""
    first_by_storage: dict[tuple, str] = {}
    shared: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if not tensor.numel():
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first_by_storage:
            shared[name] = first_by_storage[key]
        else:
            first_by_storage[key] = name
    entries = [(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]
    return plan_tensors(entries, options, shared)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    plan: QuantizationPlan,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Quantize a state_dict tensor by tensor as ``plan`` decides; returns
    ``(tensors, layers metadata)``. With ``device``, each tensor is moved there first."""
    progress = progress or Progress()
    out: dict[str, torch.Tensor] = {}
    done: dict[str, dict[str, torch.Tensor]] = {}
    items = list(state_dict.items())
    with reused_scratch():
        for name, tensor in progress.track(items, "quantize", total=len(items)):
            out.update(convert_tensor(plan, name, tensor if device is None else tensor.to(device), done))
    layers = {}
    for decision in plan.layers.values():
        if decision.changes and decision.name in done or decision.cast is not None:
            entry = decision.metadata()
            if decision.config is not None and plan.shared_with(decision.name) is None:
                entry.pop("tied_to", None)
            layers[decision.name] = entry
    return out, layers


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    bits: int = 8,
    scheme: str | None = None,
    dynamic: bool = True,
    *,
    show_progress: bool = False,
    **options: Any,
) -> Path:
    """Quantize a safetensors state_dict file into a mono_quant file, streaming.

    The output header is computed from the input header alone, then each input tensor is
    read (plain reads, no whole-file mapping), quantized and written before the next one is
    touched: peak memory is about the largest single tensor, whatever the file size.
    ``dst`` appears atomically when complete. Load the result with
    :func:`load_quantized`.

    ``options`` are :func:`mono_quant.quantize`'s (``group_size``, ``weight_only``, ``include``...,
    see :class:`~mono_quant.core.options.QuantizeOptions`); ``dynamic`` is ignored for int4 and
    16-bit runs, which have no activation mode.

    Example:
        >>> quantize_file("model.safetensors", "model-int4.safetensors", bits=4)  # doctest: +SKIP
    """
    src, dst = Path(src), Path(dst)
    callback = options.pop("progress_callback", None)
    opts = QuantizeOptions.from_kwargs(
        bits=bits,
        scheme=scheme,
        dynamic=bool(dynamic) and bits == 8 and not options.get("weight_only"),
        weight_only=bool(options.pop("weight_only", False)) and bits == 8,
        **options,
    )
    if opts.is_static:
        raise InputError(
            "static quantization needs a model it can run, but a weights file has no forward",
            suggestion="Use dynamic=True or weight_only=True on files, or quantize the nn.Module.",
        )
    header, src_meta = read_safetensors_header(src)
    plan = plan_tensors(
        [(n, tuple(e["shape"]), _ST_TO_TORCH.get(e["dtype"], torch.uint8)) for n, e in header.items()], opts
    )
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    out_entries: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    offset = 0
    for name in order:
        entry = header[name]
        dtype_in = _ST_TO_TORCH.get(entry["dtype"])
        if dtype_in is None:
            raise InputError(
                f"{src.name}: tensor {name!r} has dtype {entry['dtype']}, which torch cannot load",
                suggestion="Convert the file to standard float/int dtypes first.",
            )
        shape = tuple(entry["shape"])
        decision = plan.layers.get(_layer_of(name) or "")
        if decision is not None and decision.changes:
            layers[decision.name] = decision.metadata()
        for out_name, out_dtype, out_shape in tensor_outputs(plan, name, shape, dtype_in):
            numel = 1
            for d in out_shape:
                numel *= d
            size = numel * torch.empty((), dtype=out_dtype).element_size()
            out_entries[out_name] = {
                "dtype": _TORCH_TO_ST[out_dtype],
                "shape": list(out_shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    info = {"mode": "file", "bits": bits, "source_metadata": src_meta, "skip_reasons": plan.skipped}
    progress = Progress(show_progress, callback)
    out_header = {"__metadata__": _file_metadata(layers, info), **out_entries}
    header_bytes = json.dumps(out_header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte alignment, as safetensors does

    fd, tmp = _atomic_target(dst)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp, reused_scratch():
            header_len = int.from_bytes(inp.read(8), "little")
            data_start = 8 + header_len
            out.write(len(header_bytes).to_bytes(8, "little"))
            out.write(header_bytes)
            for name in progress.track(order, "quantize", total=len(order)):
                entry = header[name]
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=_ST_TO_TORCH[entry["dtype"]])
                inp.seek(data_start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else None
                if view is not None and inp.readinto(view) != end - begin:
                    raise InputError(f"{src.name}: tensor {name!r} is truncated", suggestion="Re-export the file.")
                for out_name, value in convert_tensor(plan, name, tensor).items():
                    assert list(value.shape) == out_entries[out_name]["shape"], out_name
                    data = value.contiguous().view(-1).view(torch.uint8).numpy() if value.numel() else b""
                    out.write(memoryview(data))
                del tensor
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
