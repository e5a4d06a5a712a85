"""What every quantized layer shares: its configuration, the registry, weight storage.

A quantized layer is built from a float layer with ``from_float(module, config)`` and keeps
real low-bit tensors in buffers (so they land in ``state_dict`` and in saved files), in the
layout :func:`mono_quant.core.plan.weight_layout` declares (``qweight``, ``weight_scale``,
``weight_zero_point``), plus ``input_scale`` / ``input_zero_point`` in static mode.

The layer's configuration (:class:`LayerQuantConfig`) is not tensor data: it goes into the
file metadata, and :func:`build_quantized_module` rebuilds an empty layer from it and the
float layer's shape before ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mono_quant.core.plan import ACTIVATION_MODES, LayerQuantConfig, weight_layout
from mono_quant.core.schemes import (
    PerTensor,
    QuantizedTensor,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from mono_quant.errors import ConfigurationError

__all__ = [
    "ACTIVATION_MODES",  # re-exported from core.plan, where they are declared
    "LayerQuantConfig",
    "QuantizedModule",
    "QUANTIZED_MODULES",
    "register_quantized_module",
    "quantized_class_for",
    "build_quantized_module",
    "quantize_weight_tensors",
    "stored_weight_tensors",
]

QUANTIZED_MODULES: dict[type[nn.Module], type[QuantizedModule]] = {}


def register_quantized_module(
    *float_types: type[nn.Module],
) -> Callable[[type[QuantizedModule]], type[QuantizedModule]]:
    """Class decorator: this quantized class replaces layers of ``float_types``."""

    def decorate(cls: type[QuantizedModule]) -> type[QuantizedModule]:
        for float_type in float_types:
            QUANTIZED_MODULES[float_type] = cls
        return cls

    return decorate


def quantized_class_for(module: nn.Module) -> type[QuantizedModule] | None:
    """The quantized class for ``module``'s exact type, or None when there is none."""
    return QUANTIZED_MODULES.get(type(module))


class QuantizedModule(nn.Module):
    """Base class of the quantized layers."""

    config: LayerQuantConfig

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig, **extra) -> QuantizedModule:
        raise NotImplementedError

    @classmethod
    def empty_like(cls, module: nn.Module, config: LayerQuantConfig) -> QuantizedModule:
        """A layer of the right shapes for ``module`` (values to come from a state_dict)."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (for validation and SQNR)."""
        return dequantize_weight(self._weight_tensor())

    def quantized_weight(self) -> QuantizedTensor:
        """The weight as integers plus qparams, in the documented layout whatever the kernel
        holds in memory: ``qdata`` unpacked (int8, or uint8 0..15 for int4) of the weight's
        shape, ``scale`` / ``zero_point`` per channel ``[out]`` or per group ``[out, groups]``.
        What exporters read."""
        return self._weight_tensor()

    # the layer whose weight tensors this one shares (a tie group quantized once), or None
    tied_to: str | None = None

    def metadata(self) -> dict:
        """What a file needs to rebuild this layer: its kind and config (and its tie)."""
        entry = {"kind": type(self).__name__, **self.config.to_dict()}
        if self.tied_to:
            entry["tied_to"] = self.tied_to
        return entry

    # -- weight storage shared by the layers -------------------------------------------------
    def _store_weight(
        self, weight: torch.Tensor, config: LayerQuantConfig, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Quantize ``weight`` into the layer's buffers, or adopt ``tensors`` already in the
        stored layout (a tied layer's, or what GPTQ / HQQ chose)."""
        self.weight_shape = tuple(weight.shape)
        tensors = quantize_weight_tensors(weight, config) if tensors is None else tensors
        for name in ("qweight", "weight_scale"):
            self.register_buffer(name, tensors[name])
        if "weight_zero_point" in tensors:
            self.register_buffer("weight_zero_point", tensors["weight_zero_point"])
        else:
            self.weight_zero_point = None

    def _register_empty(self, shape: tuple[int, ...], config: LayerQuantConfig, device=None) -> None:
        """Buffers of the stored layout for a weight of ``shape`` (values from a state_dict)."""
        self.weight_shape = tuple(shape)
        layout = weight_layout(config, tuple(shape))
        for tensor in layout:
            fill = torch.ones if tensor.name == "weight_scale" else torch.zeros
            self.register_buffer(tensor.name, fill(tensor.shape, dtype=tensor.dtype, device=device))
        if all(tensor.name != "weight_zero_point" for tensor in layout):
            self.weight_zero_point = None

    def kernel_nbytes(self) -> int:
        """Bytes a kernel holds outside the buffers (e.g. a prepacked weight), for sizes."""
        return 0

    def _canonical_qweight(self) -> torch.Tensor:
        """``qweight`` in the documented layout (a layer may keep a kernel's layout in memory)."""
        return self.qweight

    def _weight_tensor(self) -> QuantizedTensor:
        spec = self.config.weight_spec
        qweight = self._canonical_qweight()
        qdata = unpack_int4(qweight) if spec.bits == 4 else qweight
        qdata = qdata.reshape(self.weight_shape)
        zp = self.weight_zero_point
        if zp is not None and not zp.is_floating_point():  # HQQ's float zero points stay float
            zp = zp.to(torch.int32)
        return QuantizedTensor(qdata, self.weight_scale, zp, spec, self.config.granularity)

    def extra_repr(self) -> str:
        c = self.config
        group = f", group_size={c.group_size}" if c.group_size else ""
        sym = "sym" if c.symmetric else "asym"
        grid = " (asymmetric per token)" if c.activation == "dynamic" and not c.activation_symmetric else ""
        return f"shape={self.weight_shape}, int{c.bits} {sym}{group}, activation={c.activation}{grid}"


def quantize_weight_tensors(weight: torch.Tensor, config: LayerQuantConfig) -> dict[str, torch.Tensor]:
    """The stored form of a quantized weight: ``qweight``, ``weight_scale`` and, unless the
    grid is symmetric int8, ``weight_zero_point`` (see the module docstring for layouts).

    Shared by the quantized layers and the tensor-by-tensor state_dict / file quantizer, so a
    file made either way loads into the same layers.
    """
    if config.per_channel or config.group_size:
        qt = quantize_weight(
            weight, config.weight_spec, config.granularity, config.clip_search_steps, packed=config.bits == 4
        )
    else:
        # Per-tensor: one scale, stored as identical per-channel scales so that every
        # kernel and the file format have a single layout to handle.
        qt = quantize_weight(weight, config.weight_spec, PerTensor())
        rows = weight.shape[0]
        qt.scale = qt.scale.reshape(1).expand(rows).contiguous()
        if qt.zero_point is not None:
            qt.zero_point = qt.zero_point.reshape(1).expand(rows).contiguous()
    return stored_weight_tensors(qt, config)


def stored_weight_tensors(qt: QuantizedTensor, config: LayerQuantConfig) -> dict[str, torch.Tensor]:
    """A :class:`QuantizedTensor` (RTN's, HQQ's, GPTQ's) in the stored layout of ``config``
    (``core.plan.weight_layout``): int4 packed two per byte, zero points in their dtype."""
    layout = {t.name: t for t in weight_layout(config, tuple(qt.shape))}
    out = {
        "qweight": qt.qdata if qt.packed else pack_int4(qt.qdata) if qt.spec.bits == 4 else qt.qdata.to(torch.int8),
        "weight_scale": qt.scale.float().reshape(layout["weight_scale"].shape),
    }
    if "weight_zero_point" in layout:
        zero_point = qt.zero_point
        if zero_point is None:  # a symmetric int4 grid: its fixed zero point
            zero_point = torch.full_like(qt.scale, qt.spec.symmetric_zero_point)
        entry = layout["weight_zero_point"]
        out["weight_zero_point"] = zero_point.reshape(entry.shape).to(entry.dtype)
    return out


def build_quantized_module(module: nn.Module, config: LayerQuantConfig, kind: str | None = None) -> QuantizedModule:
    """An empty quantized layer for the float ``module``, ready for ``load_state_dict``."""
    cls = quantized_class_for(module)
    if cls is None or (kind is not None and cls.__name__ != kind):
        raise ConfigurationError(
            f"cannot rebuild a quantized {kind or '?'} layer in place of a {type(module).__name__}",
            suggestion="Load the file into the same model architecture it was quantized from.",
        )
    return cls.empty_like(module, config)
