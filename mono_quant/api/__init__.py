"""The public entry points: :func:`quantize`, :class:`QuantizationResult` and the errors.

Kept import-free on purpose: ``mono_quant.api.exceptions`` is a leaf module imported by every
layer of the library, and importing it must not pull in the quantizers (an import cycle).
"""
