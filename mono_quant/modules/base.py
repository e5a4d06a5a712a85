"""What every quantized layer shares: its configuration, the registry, weight storage.

A quantized layer is built from a float layer with ``from_float(module, config)`` and keeps
real low-bit tensors in buffers (so they land in ``state_dict`` and in saved files):

* ``qweight``            int8 ``[out, ...]`` or, for int4, uint8 ``[out, in // 2]`` (two
                         values per byte, low nibble first)
* ``weight_scale``       fp32 ``[out]`` (per channel) or ``[out, in // group_size]``
* ``weight_zero_point``  absent for symmetric int8; int8 ``[out]`` for asymmetric int8;
                         uint8 ``[out, in // group_size]`` for int4
* ``input_scale`` / ``input_zero_point``  static activation qparams (static mode only)

The layer's configuration (:class:`LayerQuantConfig`) is not tensor data: it goes into the
file metadata, and :func:`build_quantized_module` rebuilds an empty layer from it and the
float layer's shape before ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mono_quant.core.schemes import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantizedTensor,
    QuantSpec,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from mono_quant.errors import ConfigurationError

__all__ = [
    "ACTIVATION_MODES",
    "LayerQuantConfig",
    "QuantizedModule",
    "QUANTIZED_MODULES",
    "register_quantized_module",
    "quantized_class_for",
    "build_quantized_module",
    "quantize_weight_tensors",
]

ACTIVATION_MODES = ("none", "dynamic", "static")


@dataclass(frozen=True)
class LayerQuantConfig:
    """How one layer is quantized. Frozen and self-checking.

    * ``bits``: 8 or 4 (weights).
    * ``symmetric``: symmetric or asymmetric weight grid.
    * ``group_size``: for int4 (and optionally int8), size of the input-axis groups; None
      means per output channel.
    * ``activation``: "none" (weight-only), "dynamic" (per-token int8 at run time) or
      "static" (per-tensor int8 qparams from calibration).
    * ``activation_symmetric``: grid of the static activation qparams.
    * ``per_channel``: False gives one scale for the whole weight (int8 only).
    * ``clip_search_steps``: MSE clipping search at quantization time (0 = plain min/max).
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    activation: str = "none"
    activation_symmetric: bool = False
    per_channel: bool = True
    clip_search_steps: int = 0

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.symmetric)  # validates bits
        if self.activation not in ACTIVATION_MODES:
            raise ConfigurationError(
                f"unknown activation mode {self.activation!r}",
                suggestion=f"Use one of: {', '.join(ACTIVATION_MODES)}.",
            )
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerQuantConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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

    def metadata(self) -> dict:
        """What a file needs to rebuild this layer: its kind and config."""
        return {"kind": type(self).__name__, **self.config.to_dict()}

    # -- weight storage shared by the layers -------------------------------------------------
    def _store_weight(self, weight: torch.Tensor, config: LayerQuantConfig) -> None:
        self.weight_shape = tuple(weight.shape)
        tensors = quantize_weight_tensors(weight, config)
        for name in ("qweight", "weight_scale"):
            self.register_buffer(name, tensors[name])
        if "weight_zero_point" in tensors:
            self.register_buffer("weight_zero_point", tensors["weight_zero_point"])
        else:
            self.weight_zero_point = None

    def _register_empty(self, shape: tuple[int, ...], config: LayerQuantConfig, device=None) -> None:
        """Zero-filled buffers of the shapes ``_store_weight`` would produce."""
        rows = shape[0]
        spec = config.weight_spec
        if config.group_size:
            groups = shape[-1] // config.group_size
            qparam_shape: tuple[int, ...] = (rows, groups)
        else:
            qparam_shape = (rows,)
        q_shape = (*shape[:-1], shape[-1] // 2) if spec.bits == 4 else shape
        self.weight_shape = tuple(shape)
        self.register_buffer(
            "qweight", torch.zeros(q_shape, dtype=torch.uint8 if spec.bits == 4 else torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(qparam_shape, dtype=torch.float32, device=device))
        if spec.symmetric and spec.bits == 8:
            self.weight_zero_point = None
        else:
            zp_dtype = torch.uint8 if spec.bits == 4 else torch.int8
            self.register_buffer("weight_zero_point", torch.zeros(qparam_shape, dtype=zp_dtype, device=device))

    def kernel_tensors(self) -> list[torch.Tensor]:
        """Tensors a kernel holds outside the buffers (e.g. a prepacked weight), for sizes."""
        return []

    def _canonical_qweight(self) -> torch.Tensor:
        """``qweight`` in the documented layout (a layer may keep a kernel's layout in memory)."""
        return self.qweight

    def _weight_tensor(self) -> QuantizedTensor:
        spec = self.config.weight_spec
        qweight = self._canonical_qweight()
        qdata = unpack_int4(qweight) if spec.bits == 4 else qweight
        qdata = qdata.reshape(self.weight_shape)
        zp = None if self.weight_zero_point is None else self.weight_zero_point.to(torch.int32)
        return QuantizedTensor(qdata, self.weight_scale, zp, spec, self.config.granularity)

    def extra_repr(self) -> str:
        c = self.config
        group = f", group_size={c.group_size}" if c.group_size else ""
        sym = "sym" if c.symmetric else "asym"
        return f"shape={self.weight_shape}, int{c.bits} {sym}{group}, activation={c.activation}"


def quantize_weight_tensors(weight: torch.Tensor, config: LayerQuantConfig) -> dict[str, torch.Tensor]:
    """The stored form of a quantized weight: ``qweight``, ``weight_scale`` and, unless the
    grid is symmetric int8, ``weight_zero_point`` (see the module docstring for layouts).

    Shared by the quantized layers and the tensor-by-tensor state_dict / file quantizer, so a
    file made either way loads into the same layers.
    """
    if config.per_channel or config.group_size:
        qt = quantize_weight(weight, config.weight_spec, config.granularity, config.clip_search_steps)
    else:
        # Per-tensor: one scale, stored as identical per-channel scales so that every
        # kernel and the file format have a single layout to handle.
        qt = quantize_weight(weight, config.weight_spec, PerTensor())
        rows = weight.shape[0]
        qt.scale = qt.scale.reshape(1).expand(rows).contiguous()
        if qt.zero_point is not None:
            qt.zero_point = qt.zero_point.reshape(1).expand(rows).contiguous()
    out = {
        "qweight": pack_int4(qt.qdata) if qt.spec.bits == 4 else qt.qdata,
        "weight_scale": qt.scale.float(),
    }
    if qt.zero_point is not None:
        out["weight_zero_point"] = qt.zero_point.to(torch.uint8 if qt.spec.bits == 4 else torch.int8)
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
