"""The public surface: names, the drop-in API of mono-quant 1.1, configs and the error types."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest
import torch
from torch import nn

import mono_quant
from mono_quant import (
    ConfigurationError,
    InputError,
    InputTooLargeError,
    MonoQuantError,
    QuantizationConfig,
    QuantizationError,
    QuantizationInfo,
    UnsupportedFormatError,
    ValidationError,
)

# The top-level names a user of the public mono-quant 1.1 imports.
DROP_IN_NAMES = [
    "quantize",
    "dynamic_quantize",
    "static_quantize",
    "save_model",
    "load_model",
    "validate_quantization",
    "ValidationResult",
    "QuantizationConfig",
    "__version__",
]


@pytest.mark.parametrize("name", mono_quant.__all__)
def test_every_name_in_all_is_importable(name):
    namespace: dict = {}
    exec(f"from mono_quant import {name}", namespace)
    assert namespace[name] is getattr(mono_quant, name)


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from mono_quant import *", namespace)
    assert set(mono_quant.__all__) - {"__version__"} <= set(namespace)
    assert len(mono_quant.__all__) == len(set(mono_quant.__all__))


@pytest.mark.parametrize("name", DROP_IN_NAMES)
def test_drop_in_names_of_mono_quant_1_1(name):
    assert name in mono_quant.__all__
    assert getattr(mono_quant, name) is not None


def test_version_is_a_release_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", mono_quant.__version__)


def test_quantize_is_the_api_function():
    from mono_quant.api.quantize import quantize

    assert mono_quant.quantize is quantize
    assert mono_quant.quantize.__doc__ and "Example" in mono_quant.quantize.__doc__


# -- QuantizationInfo ----------------------------------------------------------------------------
def test_quantization_info_constructs_with_the_classic_keywords():
    info = QuantizationInfo(
        selected_layers=["fc1", "fc2"],
        skipped_layers=[],
        calibration_samples_used=100,
        dtype=torch.int32,
        symmetric=False,
    )
    assert info.selected_layers == ["fc1", "fc2"]
    assert info.skipped_layers == []
    assert info.calibration_samples_used == 100
    assert info.dtype is torch.int32
    assert info.symmetric is False
    # the rest defaults
    assert info.warnings == [] and info.skip_reasons == {} and info.metrics == {}
    assert info.group_size is None and info.observer_type is None


def test_quantization_info_defaults_do_not_share_lists():
    a, b = QuantizationInfo(), QuantizationInfo()
    a.selected_layers.append("x")
    assert b.selected_layers == []


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [(torch.qint8, 8), ("int8", 8), (torch.quint4x2, 4), ("int4", 4), (torch.float16, 16), ("bf16", 16)],
    ids=["qint8", "int8-name", "quint4x2", "int4-name", "float16", "bf16-name"],
)
def test_quantization_info_bits_and_to_dict(dtype, bits):
    info = QuantizationInfo(dtype=dtype, original_size_bytes=400, quantized_size_bytes=100)
    assert info.bits == bits
    data = info.to_dict()
    assert data["bits"] == bits
    assert isinstance(data["dtype"], str) and "torch." not in data["dtype"]
    assert data["compression_ratio"] == pytest.approx(4.0)


def test_quantization_info_with_a_classic_int32_dtype_can_be_saved(tmp_path):
    info = QuantizationInfo(
        selected_layers=["0"], skipped_layers=[], calibration_samples_used=100, dtype=torch.int32, symmetric=False
    )
    assert info.bits is None
    assert info.to_dict()["dtype"] == "int32"
    path = mono_quant.save_model(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.safetensors", info)
    assert mono_quant.read_metadata(path)["quantization_info"]["calibration_samples_used"] == 100


# -- QuantizationConfig --------------------------------------------------------------------------
def test_quantization_config_defaults():
    config = QuantizationConfig()
    assert config.dtype is torch.qint8
    assert config.bits == 8
    assert config.symmetric is True
    assert config.per_channel is True


def test_quantization_config_int4_defaults_to_asymmetric_groups_of_128():
    config = QuantizationConfig(dtype="int4")
    assert config.bits == 4
    assert config.symmetric is False
    assert config.group_size == 128


@pytest.mark.parametrize("field", ["dtype", "symmetric", "per_channel", "group_size", "observer_type"])
def test_quantization_config_is_frozen(field):
    config = QuantizationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, None)


@pytest.mark.parametrize(
    ("kwargs", "message", "suggestion"),
    [
        ({"dtype": "int3"}, "unsupported quantization dtype 'int3'", "int4"),
        ({"dtype": torch.float64}, "unsupported quantization dtype", "bfloat16"),
        ({"symmetric": "yes"}, "symmetric must be True or False, got 'yes'", "symmetric=True"),
        ({"per_channel": 1}, "per_channel must be True or False, got 1", "per_channel=False"),
        ({"group_size": 3}, "group_size must be a power of two from 16 to 1024, got 3", "group_size=32"),
        ({"group_size": 0}, "group_size must be a power of two from 16 to 1024, got 0", "group_size=32"),
        ({"num_calibration_samples": 0}, "num_calibration_samples must be an integer >= 1", "128"),
    ],
    ids=["dtype-int3", "dtype-float64", "symmetric-str", "per-channel-int", "group-3", "group-0", "samples-0"],
)
def test_quantization_config_rejects_invalid_values(kwargs, message, suggestion):
    with pytest.raises(ConfigurationError) as excinfo:
        QuantizationConfig(**kwargs)
    assert message in excinfo.value.message
    assert suggestion in excinfo.value.suggestion


def test_quantizers_accept_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    qmodel, skipped = mono_quant.dynamic_quantize(model, config=QuantizationConfig(dtype=torch.qint8))
    assert skipped == []
    assert type(qmodel[0]).__name__ == "QuantizedLinear"

    config = QuantizationConfig(dtype=torch.qint8, observer_type="histogram", num_calibration_samples=24)
    qmodel, info = mono_quant.static_quantize(model, torch.randn(64, 32), config=config)
    assert info.observer_type == "histogram"
    assert info.calibration_samples_used == 24
    assert qmodel[0].config.activation == "static"


def test_quantizers_reject_a_config_of_the_wrong_type():
    with pytest.raises(ConfigurationError, match="config must be a QuantizationConfig, got dict"):
        mono_quant.dynamic_quantize(nn.Sequential(nn.Linear(4, 4)), config={"dtype": "int8"})


def test_dynamic_quantize_returns_model_and_skipped_names_like_1_1():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    qmodel, skipped = mono_quant.dynamic_quantize(model, dtype=torch.qint8, exclude=["1"])
    assert skipped == ["1"]
    assert type(qmodel[0]).__name__ == "QuantizedLinear"
    assert type(qmodel[1]) is nn.Linear


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (ConfigurationError, MonoQuantError),
        (InputError, MonoQuantError),
        (UnsupportedFormatError, InputError),
        (InputTooLargeError, InputError),
        (QuantizationError, MonoQuantError),
        (ValidationError, MonoQuantError),
        (MonoQuantError, Exception),
    ],
    ids=lambda c: c.__name__,
)
def test_error_hierarchy(cls, parent):
    assert issubclass(cls, parent)


def test_error_str_carries_the_suggestion():
    error = ConfigurationError("bits=5 is not supported", suggestion="Use bits=4, 8 or 16.")
    assert str(error) == "bits=5 is not supported\nSuggestion: Use bits=4, 8 or 16."
    assert error.to_dict() == {
        "type": "ConfigurationError",
        "message": "bits=5 is not supported",
        "suggestion": "Use bits=4, 8 or 16.",
    }
    assert str(InputError("no suggestion")) == "no suggestion"


def test_error_survives_pickling():
    error = UnsupportedFormatError("refused", suggestion="use safetensors")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is UnsupportedFormatError
    assert (copy.message, copy.suggestion) == ("refused", "use safetensors")
