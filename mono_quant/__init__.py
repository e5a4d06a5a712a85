"""mono_quant: model-agnostic PyTorch quantization.

INT8 (dynamic per-token and static calibrated), INT4 group-wise weight-only, FP16/BF16;
layer selection; safetensors files with real low-bit tensors; validation.

Example:
    >>> import torch.nn as nn
    >>> from mono_quant import quantize
    >>> result = quantize(nn.Sequential(nn.Linear(64, 64)), bits=8, dynamic=True)
    >>> bool(result)
    True
"""

from mono_quant.api.quantize import quantize
from mono_quant.api.result import QuantizationResult
from mono_quant.core.config import QuantizationConfig
from mono_quant.core.quantizers import QuantizationInfo, dynamic_quantize, static_quantize
from mono_quant.errors import (
    ConfigurationError,
    InputError,
    InputTooLargeError,
    MonoQuantError,
    QuantizationError,
    UnsupportedFormatError,
    ValidationError,
)
from mono_quant.io.formats import load_model, load_quantized, quantize_file, read_metadata, save_model
from mono_quant.io.validation import ValidationResult, validate_quantization
from mono_quant.version import __version__

__all__ = [
    "__version__",
    "quantize",
    "QuantizationResult",
    "QuantizationInfo",
    "QuantizationConfig",
    "dynamic_quantize",
    "static_quantize",
    "save_model",
    "load_model",
    "load_quantized",
    "read_metadata",
    "quantize_file",
    "validate_quantization",
    "ValidationResult",
    "MonoQuantError",
    "ConfigurationError",
    "InputError",
    "UnsupportedFormatError",
    "InputTooLargeError",
    "QuantizationError",
    "ValidationError",
]
