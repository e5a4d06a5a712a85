"""QuantizedLSTM / QuantizedGRU: int8 weight storage, float compute.

Choice: the recurrent weight matrices (``weight_ih_l*``, ``weight_hh_l*``, and
``weight_hr_l*`` for projected LSTMs) are stored int8 per output row; biases stay float.
Forward dequantizes them and runs torch's fused RNN kernel through a parameter-less "shell"
module on the meta device, so every feature of ``nn.LSTM`` / ``nn.GRU`` (batch_first,
bidirectional, packed sequences, initial states, projections) behaves exactly as before.
Activations are not quantized: a recurrent cell feeds its own output back, and int8
activations there compound error at every time step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from mono_quant.core.schemes import QuantizedTensor, dequantize_weight, quantize_weight
from mono_quant.errors import ConfigurationError
from mono_quant.modules.base import LayerQuantConfig, QuantizedModule, register_quantized_module

__all__ = ["QuantizedLSTM", "QuantizedGRU"]


class _QuantizedRNNBase(QuantizedModule):
    def __init__(self, module: nn.RNNBase, config: LayerQuantConfig) -> None:
        super().__init__()
        if config.bits != 8 or config.group_size is not None:
            raise ConfigurationError(
                f"{type(module).__name__} layers support int8 per-channel weights only, got "
                f"bits={config.bits}, group_size={config.group_size}",
                suggestion="Quantize recurrent layers with bits=8, or leave them out of int4 "
                "runs (layer_types=['linear', 'embedding']).",
            )
        self.config = LayerQuantConfig(8, config.symmetric, None, "none")
        shell = copy.deepcopy(module).to("meta")
        # Kept out of the module tree: the shell has no data, it only lends its forward.
        object.__setattr__(self, "_shell", shell)
        self.weight_names = [n for n, _ in module.named_parameters() if n.startswith("weight_")]
        self.bias_names = [n for n, _ in module.named_parameters() if n.startswith("bias_")]
        self.weight_shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}

    @classmethod
    def from_float(cls, module, config, **_):
        layer = cls(module, config)
        spec, granularity = layer.config.weight_spec, layer.config.granularity
        for name in layer.weight_names:
            qt = quantize_weight(getattr(module, name), spec, granularity)
            layer.register_buffer(f"{name}_q", qt.qdata)
            layer.register_buffer(f"{name}_scale", qt.scale)
            if qt.zero_point is not None:
                layer.register_buffer(f"{name}_zero_point", qt.zero_point.to(torch.int8))
        for name in layer.bias_names:
            layer.register_buffer(name, getattr(module, name).detach().clone())
        return layer

    @classmethod
    def empty_like(cls, module, config):
        layer = cls(module, config)
        device = next(module.parameters()).device
        device = None if device.type == "meta" else device
        for name in layer.weight_names:
            shape = layer.weight_shapes[name]
            layer.register_buffer(f"{name}_q", torch.zeros(shape, dtype=torch.int8, device=device))
            layer.register_buffer(f"{name}_scale", torch.ones(shape[0], device=device))
            if not layer.config.symmetric:
                layer.register_buffer(f"{name}_zero_point", torch.zeros(shape[0], dtype=torch.int8, device=device))
        for name in layer.bias_names:
            layer.register_buffer(name, torch.zeros(layer.weight_shapes[name], device=device))
        return layer

    def _quantized(self, name: str) -> QuantizedTensor:
        zp = getattr(self, f"{name}_zero_point", None)
        return QuantizedTensor(
            getattr(self, f"{name}_q"),
            getattr(self, f"{name}_scale"),
            None if zp is None else zp.to(torch.int32),
            self.config.weight_spec,
            self.config.granularity,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """All weight matrices dequantized and concatenated (for SQNR)."""
        return torch.cat([dequantize_weight(self._quantized(n)).flatten() for n in self.weight_names])

    def dequantized_parameters(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        params = {n: dequantize_weight(self._quantized(n), dtype) for n in self.weight_names}
        params.update({n: getattr(self, n).to(dtype) for n in self.bias_names})
        return params

    def forward(self, *args, **kwargs):
        inputs = args[0]
        data = inputs.data if isinstance(inputs, nn.utils.rnn.PackedSequence) else inputs
        dtype = data.dtype if data.is_floating_point() else torch.float32
        return functional_call(self._shell, self.dequantized_parameters(dtype), args, kwargs)

    def extra_repr(self) -> str:
        return f"{self._shell.extra_repr()}, int8 {'sym' if self.config.symmetric else 'asym'} weights"


@register_quantized_module(nn.LSTM)
class QuantizedLSTM(_QuantizedRNNBase):
    """nn.LSTM with int8 weights (see module docstring)."""


@register_quantized_module(nn.GRU)
class QuantizedGRU(_QuantizedRNNBase):
    """nn.GRU with int8 weights (see module docstring)."""
