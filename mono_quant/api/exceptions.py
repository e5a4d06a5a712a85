"""The documented import path of the exception hierarchy; the classes live in
:mod:`mono_quant.errors`, a leaf module every layer of the library may import."""

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
    "MonoQuantError",
    "ConfigurationError",
    "InputError",
    "UnsupportedFormatError",
    "InputTooLargeError",
    "QuantizationError",
    "ValidationError",
]
