"""validate_quantization and QuantizationResult.validate(): real metrics and failure handling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mono_quant import (
    ConfigurationError,
    InputError,
    ValidationError,
    ValidationResult,
    quantize,
    validate_quantization,
)
from mono_quant.core.quantizers import model_size_bytes

from .conftest import build, inputs


@pytest.fixture(scope="module")
def int8_result():
    return quantize(build("mlp"), bits=8, dynamic=True)


@pytest.fixture(scope="module")
def int4_result():
    return quantize(build("mlp"), bits=4, group_size=32)


def test_int8_metrics(int8_result):
    original = build("mlp")
    result = int8_result.validate(inputs("mlp", n=32))

    assert isinstance(result, ValidationResult)
    assert result.passed and bool(result)
    assert set(result.layer_sqnr_db) == {"fc1", "fc2", "head"}
    for name, value in result.layer_sqnr_db.items():
        assert math.isfinite(value), name
        assert 25.0 < value < 80.0, (name, value)  # int8 per channel: ~40-50 dB
    assert result.min_weight_sqnr_db == min(result.layer_sqnr_db.values())
    assert result.mean_weight_sqnr_db == pytest.approx(sum(result.layer_sqnr_db.values()) / 3)
    assert 20.0 < result.output_sqnr_db < 80.0
    assert 0.999 < result.output_cosine <= 1.0 + 1e-6
    assert result.original_size_bytes == model_size_bytes(original)
    assert result.quantized_size_bytes == model_size_bytes(int8_result.model)
    assert result.compression_ratio == pytest.approx(result.original_size_bytes / result.quantized_size_bytes)
    assert result.compression_ratio > 3.0
    assert result.reload_ok is True
    assert result.errors == []
    assert any("every layer is quantized" in w for w in result.warnings)


def test_int4_is_measurably_worse_than_int8(int8_result, int4_result):
    x = inputs("mlp", n=32)
    int8 = int8_result.validate(x)
    int4 = int4_result.validate(x)
    assert int4.passed
    assert all(math.isfinite(v) and v > 10.0 for v in int4.layer_sqnr_db.values())
    assert int4.mean_weight_sqnr_db < int8.mean_weight_sqnr_db - 10.0
    assert int4.output_sqnr_db < int8.output_sqnr_db
    assert int4.compression_ratio > int8.compression_ratio


def test_fp16_is_near_lossless():
    result = quantize(build("mlp"), bits=16).validate(inputs("mlp"))
    assert all(v > 60.0 for v in result.layer_sqnr_db.values())
    assert result.compression_ratio == pytest.approx(2.0, rel=0.01)
    assert not any("every layer is quantized" in w for w in result.warnings)


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_other_architectures(kind):
    result = quantize(build(kind), bits=8, dynamic=True).validate(inputs(kind))
    assert result.passed, result.errors
    assert len(result.layer_sqnr_db) == 3
    assert all(math.isfinite(v) and v > 25.0 for v in result.layer_sqnr_db.values())
    assert result.output_cosine > 0.99


def test_without_sample_inputs_there_are_no_output_metrics(int8_result):
    result = int8_result.validate()
    assert result.output_sqnr_db is None and result.output_cosine is None
    assert result.layer_sqnr_db and result.reload_ok is True


def test_validate_quantization_directly(int8_result):
    result = validate_quantization(build("mlp"), int8_result.model, inputs("mlp"), check_reload=False)
    assert result.passed
    assert result.reload_ok is None
    assert result.output_sqnr_db > 20.0


def test_an_impossible_threshold_raises_validation_error(int8_result):
    with pytest.raises(ValidationError) as excinfo:
        int8_result.validate(inputs("mlp"), sqnr_threshold_db=200)
    assert excinfo.value.message.startswith(
        "quantization validation failed: 3 layer(s) below the weight SQNR threshold of 200 dB"
    )
    assert "more bits" in excinfo.value.suggestion and "exclude" in excinfo.value.suggestion


def test_an_impossible_output_threshold_raises_validation_error(int8_result):
    with pytest.raises(ValidationError, match=r"output SQNR [\d.]+ dB is below the threshold of 200 dB"):
        int8_result.validate(inputs("mlp"), output_sqnr_threshold_db=200)


def test_on_failure_warn(int8_result):
    with pytest.warns(UserWarning, match="quantization validation failed: 3 layer"):
        result = int8_result.validate(on_failure="warn", sqnr_threshold_db=200)
    assert result.passed is False and not result
    assert len(result.errors) == 1


def test_on_failure_ignore_records_quietly(int8_result):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = int8_result.validate(on_failure="ignore", sqnr_threshold_db=200)
    assert result.passed is False
    assert result.errors[0].startswith("3 layer(s) below the weight SQNR threshold of 200 dB")
    assert int8_result.info.metrics["validation"]["passed"] is False


@pytest.mark.parametrize("on_failure", ["raise", "ERROR", None, ""], ids=repr)
def test_invalid_on_failure(int8_result, on_failure):
    with pytest.raises(ConfigurationError) as excinfo:
        int8_result.validate(on_failure=on_failure)
    assert excinfo.value.message == f"on_failure must be one of ('error', 'warn', 'ignore'), got {on_failure!r}"
    assert "'warn'" in excinfo.value.suggestion


def test_state_dict_results_validate_from_the_weights():
    state = build("mlp").state_dict()
    result = quantize(state, bits=8, dynamic=True).validate()
    assert result.passed
    assert set(result.layer_sqnr_db) == {"fc1", "fc2", "head"}
    assert all(v > 25.0 for v in result.layer_sqnr_db.values())
    assert result.reload_ok is True
    assert result.compression_ratio > 3.0


def test_state_dict_results_say_why_outputs_are_not_checked():
    result = quantize(build("mlp").state_dict(), bits=4, group_size=32).validate(inputs("mlp"))
    assert result.output_sqnr_db is None
    assert "output checks need a runnable model; a state_dict has no forward" in result.warnings
    assert all(10.0 < v < 40.0 for v in result.layer_sqnr_db.values())


def test_to_dict_is_json_ready(int8_result):
    import json

    data = int8_result.validate(inputs("mlp")).to_dict()
    assert json.loads(json.dumps(data))["passed"] is True


def test_to_dict_replaces_infinities():
    data = ValidationResult(layer_sqnr_db={"a": math.inf}, output_sqnr_db=math.nan).to_dict()
    assert data["layer_sqnr_db"] == {"a": 1e9}
    assert data["output_sqnr_db"] is None


def test_lossless_layers_give_infinite_sqnr_without_failing():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8) * 127 / 64)  # exactly representable on the int8 grid
    result = quantize(model, bits=8, dynamic=True).validate()
    assert result.passed
    assert result.layer_sqnr_db["0"] == math.inf


def test_a_module_result_needs_a_module_original(int8_result):
    with pytest.raises(InputError) as excinfo:
        validate_quantization(build("mlp").state_dict(), int8_result.model)
    assert excinfo.value.message == (
        "the quantized model is an nn.Module, so the original must be one too, got OrderedDict"
    )
    assert "nn.Module" in excinfo.value.suggestion


def test_a_state_dict_result_accepts_a_module_original():
    result = quantize(build("mlp").state_dict(), bits=8, dynamic=True)
    validation = validate_quantization(build("mlp"), result.model, layers=result.layers)
    assert validation.passed
    assert set(validation.layer_sqnr_db) == {"fc1", "fc2", "head"}


def test_validating_something_else_is_an_input_error():
    with pytest.raises(InputError, match="cannot validate an object of type list"):
        validate_quantization(build("mlp"), [1, 2, 3])
