"""The public entry points: :func:`quantize`, :class:`QuantizationResult` and the errors.

Example:
    >>> from mono_quant.api import quantize, QuantizationResult, ConfigurationError
"""

from mono_quant.api.quantize import quantize
from mono_quant.api.result import QuantizationResult
from mono_quant.errors import (
    ConfigurationError,
    InputError,
    InputTooLargeError,
    MonoQuantError,
    QuantizationError,
    UnsupportedFormatError,
    ValidationError,
)

__all__ = [
    "quantize",
    "QuantizationResult",
    "MonoQuantError",
    "ConfigurationError",
    "InputError",
    "UnsupportedFormatError",
    "InputTooLargeError",
    "QuantizationError",
    "ValidationError",
]
