"""QuantizedConv1d / QuantizedConv2d: int8 per-output-channel weights.

Forward dequantizes the weight to the input's dtype and runs torch's own convolution (torch
has no int8 convolution outside its deprecated quantized backend). In static mode the input
is first quantized to int8 with the calibrated per-tensor qparams and dequantized again, so
the layer computes exactly what an int8 x int8 convolution with fp32 accumulation would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import INT8_ASYMMETRIC, INT8_SYMMETRIC
from mono_quant.errors import ConfigurationError
from mono_quant.modules.base import LayerQuantConfig, QuantizedModule, register_quantized_module

__all__ = ["QuantizedConv1d", "QuantizedConv2d"]


class _QuantizedConvNd(QuantizedModule):
    _conv = staticmethod(F.conv2d)
    _float_type: type[nn.Module] = nn.Conv2d

    def __init__(self, conv: nn.Module, config: LayerQuantConfig) -> None:
        super().__init__()
        if config.bits != 8 or config.group_size is not None:
            raise ConfigurationError(
                f"{type(conv).__name__} layers support int8 per-channel weights only, "
                f"got bits={config.bits}, group_size={config.group_size}",
                suggestion="Quantize convolutions with bits=8, or exclude them from int4 runs "
                "(layer_types=['linear', 'embedding']).",
            )
        if conv.padding_mode != "zeros":
            raise ConfigurationError(
                f"padding_mode={conv.padding_mode!r} is not supported by quantized convolutions",
                suggestion="Exclude this layer (exclude=[name]) or use padding_mode='zeros'.",
            )
        self.config = config
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups

    @classmethod
    def from_float(cls, module, config, input_qparams=None):
        layer = cls(module, config)
        layer._store_weight(module.weight, config)
        layer._finish(module.bias, input_qparams, module.weight.device)
        return layer

    @classmethod
    def empty_like(cls, module, config):
        layer = cls(module, config)
        device = module.weight.device if module.weight.device.type != "meta" else None
        layer._register_empty(tuple(module.weight.shape), config, device)
        bias = None if module.bias is None else torch.zeros(module.out_channels, device=device)
        qparams = (torch.ones((), device=device), torch.zeros((), dtype=torch.int32, device=device))
        layer._finish(bias, qparams if config.activation == "static" else None, device)
        return layer

    def _finish(self, bias, input_qparams, device) -> None:
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        if self.config.activation == "static":
            scale, zero_point = input_qparams
            self.register_buffer("input_scale", scale.detach().float().reshape(()).clone())
            self.register_buffer("input_zero_point", zero_point.detach().to(torch.int32).reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.config.activation == "static":
            spec = INT8_SYMMETRIC if self.config.activation_symmetric else INT8_ASYMMETRIC
            xq = torch.div(x.float(), self.input_scale).round_().add_(self.input_zero_point)
            xq = xq.clamp_(spec.qmin, spec.qmax).to(torch.int8)
            x = ((xq.float() - self.input_zero_point) * self.input_scale).to(compute_dtype)
        weight = self.dequantized_weight().to(compute_dtype)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        return self._conv(x.to(compute_dtype), weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, " + super().extra_repr()
        )


@register_quantized_module(nn.Conv2d)
class QuantizedConv2d(_QuantizedConvNd):
    """Conv2d with int8 per-output-channel weights (see module docstring)."""

    _conv = staticmethod(F.conv2d)


@register_quantized_module(nn.Conv1d)
class QuantizedConv1d(_QuantizedConvNd):
    """Conv1d with int8 per-output-channel weights (see module docstring)."""

    _conv = staticmethod(F.conv1d)
