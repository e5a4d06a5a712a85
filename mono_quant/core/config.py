"""QuantizationConfig and the translation of user-facing dtypes into bit widths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mono_quant.core.options import DEFAULT_GROUP_SIZE, QuantizeOptions
from mono_quant.errors import ConfigurationError

__all__ = ["QuantizationConfig", "resolve_dtype", "VALID_DTYPES"]

# name -> (bits, float dtype for 16-bit casts)
_DTYPE_ALIASES: dict[object, tuple[int, torch.dtype | None]] = {
    torch.qint8: (8, None),
    torch.int8: (8, None),
    torch.quint8: (8, None),
    "int8": (8, None),
    "qint8": (8, None),
    torch.quint4x2: (4, None),
    "int4": (4, None),
    "quint4x2": (4, None),
    torch.float16: (16, torch.float16),
    "float16": (16, torch.float16),
    "fp16": (16, torch.float16),
    torch.bfloat16: (16, torch.bfloat16),
    "bfloat16": (16, torch.bfloat16),
    "bf16": (16, torch.bfloat16),
}
VALID_DTYPES = ("int8 / torch.qint8", "int4 / torch.quint4x2", "float16", "bfloat16")


def resolve_dtype(dtype: object) -> tuple[int, torch.dtype | None]:
    """``(bits, float_dtype)`` for a dtype given as a torch dtype or a name.

    Example:
        >>> resolve_dtype("int4")
        (4, None)
    """
    key = dtype.lower() if isinstance(dtype, str) else dtype
    try:
        return _DTYPE_ALIASES[key]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"unsupported quantization dtype {dtype!r}",
            suggestion=f"Use one of: {', '.join(VALID_DTYPES)}.",
        ) from None


@dataclass(frozen=True)
class QuantizationConfig:
    """Frozen, self-checking quantization settings accepted by the quantizers as ``config=``.

    Example:
        >>> QuantizationConfig(dtype=torch.qint8, symmetric=True).bits
        8
    """

    dtype: object = torch.qint8
    symmetric: bool | None = None
    per_channel: bool = True
    group_size: int | None = None
    observer_type: str = "minmax"
    num_calibration_samples: int = 128
    activation_symmetric: bool = False

    def __post_init__(self) -> None:
        bits, _ = resolve_dtype(self.dtype)
        if self.symmetric is None:  # int8 symmetric, int4 asymmetric unless asked otherwise
            object.__setattr__(self, "symmetric", bits != 4)
        for name in ("symmetric", "per_channel", "activation_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}",
                    suggestion=f"Pass {name}=True or {name}=False.",
                )
        # The rules of group_size and num_calibration_samples live in QuantizeOptions.
        QuantizeOptions(bits=4, group_size=self.group_size)
        QuantizeOptions(num_calibration_samples=self.num_calibration_samples)
        if bits == 4 and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)

    @property
    def bits(self) -> int:
        return resolve_dtype(self.dtype)[0]

    @property
    def float_dtype(self) -> torch.dtype | None:
        return resolve_dtype(self.dtype)[1]
