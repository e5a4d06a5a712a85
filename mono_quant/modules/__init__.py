"""Quantized layers, one file per layer kind; importing this package registers them all."""

from mono_quant.modules.base import (
    QUANTIZED_MODULES,
    LayerQuantConfig,
    QuantizedModule,
    build_quantized_module,
    quantize_weight_tensors,
    quantized_class_for,
    register_quantized_module,
    stored_weight_tensors,
)
from mono_quant.modules.conv import QuantizedConv1d, QuantizedConv2d
from mono_quant.modules.embedding import QuantizedEmbedding
from mono_quant.modules.linear import QuantizedLinear, packed_together
from mono_quant.modules.rnn import QuantizedGRU, QuantizedLSTM

__all__ = [
    "QUANTIZED_MODULES",
    "LayerQuantConfig",
    "QuantizedModule",
    "QuantizedLinear",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLSTM",
    "QuantizedGRU",
    "build_quantized_module",
    "packed_together",
    "quantized_class_for",
    "register_quantized_module",
    "quantize_weight_tensors",
    "stored_weight_tensors",
]
