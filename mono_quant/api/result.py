"""QuantizationResult: what :func:`mono_quant.quantize` returns."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.core.quantizers import QuantizationInfo

__all__ = ["QuantizationResult"]


@dataclass
class QuantizationResult:
    """The quantized model, what happened, and whether it worked.

    ``bool(result)`` is ``result.success``, which is False as soon as ``errors`` is non-empty.
    The result keeps a reference to the original model (not a copy) so that
    :meth:`validate` can compare against it.

    Example:
        >>> result = quantize(model, bits=8, dynamic=True)  # doctest: +SKIP
        >>> if result:
        ...     result.save("model-int8.safetensors")
    """

    model: nn.Module | dict[str, torch.Tensor] | None
    info: QuantizationInfo
    success: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    original: Any = field(default=None, repr=False, compare=False)
    layers: dict[str, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.errors:
            self.success = False

    def __bool__(self) -> bool:
        return self.success

    def _require_model(self, action: str):
        if not self.success or self.model is None:
            from mono_quant.errors import QuantizationError

            raise QuantizationError(
                f"cannot {action}: quantization failed ({'; '.join(self.errors) or 'no model'})",
                suggestion="Fix the error above and quantize again.",
            )

    def save(
        self,
        path: str | os.PathLike,
        format: str | None = None,
        *,
        tokenizer: Any = None,
        sample_inputs: Any = None,
    ) -> Path:
        """Write the quantized model to ``path``; returns the path written.

        ``format=None``: mono_quant's safetensors (real low-bit tensors + metadata, loaded by
        :func:`mono_quant.load_quantized`). Otherwise one of
        :data:`mono_quant.export.EXPORT_FORMATS`: ``"compressed-tensors"`` (a Hugging Face
        folder for transformers / vLLM), ``"gguf"`` (llama.cpp) or ``"onnx"`` (ONNX
        Runtime). ``tokenizer`` (a transformers tokenizer or a folder) is used by the
        formats that embed one; ``sample_inputs`` (a dict of tensors or a tuple for the
        model's forward) by ONNX's tracing. A mode the format cannot represent raises
        ConfigurationError naming the modes it can.

        Example:
            >>> result.save("out_dir", format="compressed-tensors", tokenizer=tok)  # doctest: +SKIP
        """
        self._require_model("save")
        if format is None:
            from mono_quant.io.formats import save_model

            for name, value in (("tokenizer", tokenizer), ("sample_inputs", sample_inputs)):
                if value is not None:
                    from mono_quant.errors import ConfigurationError

                    raise ConfigurationError(
                        f"{name} is used by the export formats, not by mono_quant's own safetensors file",
                        suggestion="Pass format='compressed-tensors', 'gguf' or 'onnx', or drop the argument.",
                    )
            layers = None if isinstance(self.model, nn.Module) else self.layers
            return save_model(self.model, path, self.info, layers=layers)
        from mono_quant.export import get_format

        exporter = get_format(format)
        exporter.check(self.info)
        return exporter.export(
            self.model,
            path,
            original=self.original,
            info=self.info,
            tokenizer=tokenizer,
            sample_inputs=sample_inputs,
        )

    def validate(self, sample_inputs: Any = None, on_failure: str = "error", **kwargs):
        """Run :func:`mono_quant.validate_quantization` against the original model; the
        result is also stored in ``info.metrics["validation"]``."""
        from mono_quant.io.validation import validate_quantization

        self._require_model("validate")
        layers = None if isinstance(self.model, nn.Module) else self.layers
        result = validate_quantization(
            self.original,
            self.model,
            sample_inputs,
            on_failure=on_failure,
            bits=self.info.bits,
            layers=layers,
            **kwargs,
        )
        self.info.metrics["validation"] = result.to_dict()
        return result

    @property
    def is_state_dict(self) -> bool:
        return isinstance(self.model, Mapping)
