"""QuantizationConfig and dtype names: typed at the boundary, unknown values refused."""

from __future__ import annotations

import pytest
import torch

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.config import QuantizationConfig, resolve_dtype


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.qint8, (8, None)),
        (torch.int8, (8, None)),
        ("int8", (8, None)),
        ("INT8", (8, None)),
        (torch.quint4x2, (4, None)),
        ("int4", (4, None)),
        (torch.float16, (16, torch.float16)),
        ("fp16", (16, torch.float16)),
        (torch.bfloat16, (16, torch.bfloat16)),
        ("bf16", (16, torch.bfloat16)),
    ],
    ids=str,
)
def test_resolve_dtype(dtype, expected):
    assert resolve_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", ["int5", "float32", torch.float32, 8, None, ["int8"]], ids=repr)
def test_unknown_dtype_lists_the_valid_ones(dtype):
    with pytest.raises(ConfigurationError, match="unsupported quantization dtype") as info:
        resolve_dtype(dtype)
    for name in ("int8", "int4", "float16", "bfloat16"):
        assert name in info.value.suggestion
    assert info.value.suggestion in str(info.value)


def test_defaults_int8_symmetric_int4_asymmetric_group_128():
    int8 = QuantizationConfig()
    assert (int8.bits, int8.symmetric, int8.group_size) == (8, True, None)
    int4 = QuantizationConfig(dtype="int4")
    assert (int4.bits, int4.symmetric, int4.group_size) == (4, False, 128)
    assert QuantizationConfig(dtype="int4", symmetric=True).symmetric is True
    assert QuantizationConfig(dtype="int4", group_size=32).group_size == 32


def test_config_is_frozen():
    config = QuantizationConfig()
    with pytest.raises(AttributeError):
        config.symmetric = False  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 48}, "group_size must be a power of two"),
        ({"group_size": 1}, "group_size must be a power of two from 16"),
        ({"group_size": "128"}, "group_size must be a power of two"),
        ({"symmetric": "yes"}, "symmetric must be True or False"),
        ({"per_channel": 1}, "per_channel must be True or False"),
        ({"num_calibration_samples": 0}, "num_calibration_samples must be an integer >= 1"),
        ({"num_calibration_samples": 2.5}, "num_calibration_samples must be an integer >= 1"),
        ({"dtype": "int3"}, "unsupported quantization dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_bad_values_raise_configuration_error_with_suggestion(kwargs, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        QuantizationConfig(**kwargs)
    assert info.value.suggestion and info.value.suggestion in str(info.value)
