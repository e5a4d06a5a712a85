"""The exception hierarchy of mono_quant.

Every error carries a ``suggestion``: what the caller can do about it. ``str(error)`` contains
both, so a traceback or a log line is enough to act on. This module is a leaf (it imports
nothing from mono_quant) so that every layer of the library can raise these errors.

    MonoQuantError(message, suggestion=None)
    ├── ConfigurationError   an argument or option is invalid (bits=5, scheme="foo", ...)
    ├── InputError           the model / data / file given cannot be used as it is
    │   ├── UnsupportedFormatError   a file format we refuse or do not know
    │   └── InputTooLargeError       a size limit was exceeded
    ├── QuantizationError    quantization itself failed on valid input
    └── ValidationError      a quantized model failed a quality or integrity check
"""

from __future__ import annotations

__all__ = [
    "MonoQuantError",
    "ConfigurationError",
    "InputError",
    "UnsupportedFormatError",
    "InputTooLargeError",
    "QuantizationError",
    "ValidationError",
]


class MonoQuantError(Exception):
    """Base class of every error mono_quant raises on purpose.

    Example:
        >>> err = MonoQuantError("bits=5 is not supported", suggestion="Use bits=4, 8 or 16.")
        >>> str(err)
        'bits=5 is not supported\\nSuggestion: Use bits=4, 8 or 16.'
    """

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion

    def __str__(self) -> str:
        if self.suggestion:
            return f"{self.message}\nSuggestion: {self.suggestion}"
        return self.message

    def __reduce__(self):  # keeps message and suggestion across pickling (worker processes)
        return (type(self), (self.message, self.suggestion))

    def to_dict(self) -> dict[str, str | None]:
        """The error as plain data: ``{"type", "message", "suggestion"}``."""
        return {"type": type(self).__name__, "message": self.message, "suggestion": self.suggestion}


class ConfigurationError(MonoQuantError):
    """An argument or option has a value we cannot use; the suggestion lists valid values."""


class InputError(MonoQuantError):
    """The model, calibration data or file given cannot be used as it is."""


class UnsupportedFormatError(InputError):
    """A file format that is unknown, or refused because loading it could run code."""


class InputTooLargeError(InputError):
    """An input exceeds a configured size limit."""


class QuantizationError(MonoQuantError):
    """Quantization failed on input that looked valid (numerical trouble, a layer's forward...)."""


class ValidationError(MonoQuantError):
    """A quantized model failed a quality or integrity check (SQNR, reload, ...)."""
