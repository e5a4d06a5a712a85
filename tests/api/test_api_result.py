"""QuantizationResult: truthiness, errors, and the guards on save() / validate()."""

from __future__ import annotations

import pytest
import torch

from mono_quant import QuantizationError, QuantizationInfo, QuantizationResult, load_quantized, quantize

from .conftest import make_mlp


def test_bool_is_success(mlp):
    result = quantize(mlp, bits=8, dynamic=True)
    assert bool(result) is True
    result.success = False
    assert bool(result) is False


def test_errors_make_the_result_unsuccessful():
    result = QuantizationResult(model=None, info=QuantizationInfo(), success=True, errors=["RuntimeError: x"])
    assert result.success is False
    assert not result


def test_no_errors_keeps_success():
    result = QuantizationResult(model={}, info=QuantizationInfo())
    assert result.success is True
    assert result.errors == [] and result.warnings == []


def test_a_failed_result_cannot_be_saved_or_validated(tmp_path):
    result = QuantizationResult(model=None, info=QuantizationInfo(), errors=["ValueError: bad weights"])
    with pytest.raises(QuantizationError) as excinfo:
        result.save(tmp_path / "out.safetensors")
    assert excinfo.value.message == "cannot save: quantization failed (ValueError: bad weights)"
    assert excinfo.value.suggestion
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantizationError, match="cannot validate: quantization failed"):
        result.validate()


def test_save_returns_the_path_and_round_trips(tmp_path, mlp, mlp_inputs):
    result = quantize(mlp, bits=8, dynamic=True)
    path = result.save(tmp_path / "q.safetensors")
    assert path == tmp_path / "q.safetensors" and path.is_file()
    restored = load_quantized(path, make_mlp(seed=123))
    with torch.inference_mode():
        assert torch.equal(restored(mlp_inputs), result.model(mlp_inputs))


def test_quantized_and_loaded_int8_layers_pack_together_on_the_first_forward(tmp_path, mlp, mlp_inputs):
    """quantize() and load_quantized build their int8 layers as one group: the model's first
    forward packs every layer for this CPU's int8 engine at once (in parallel), not one layer
    per first call."""
    from mono_quant.modules import QuantizedLinear, kernels

    if kernels.cpu_int8_engine() is None:
        pytest.skip("this torch build has no prepacked int8 engine")
    result = quantize(mlp, bits=8, dynamic=True)
    restored = load_quantized(result.save(tmp_path / "q.safetensors"), make_mlp(seed=123))
    for model in (result.model, restored):
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 3 and {layer.qweight_layout for layer in layers} == {"packed"}
        with torch.inference_mode():
            layers[-1](torch.randn(2, 128))  # the last layer's first call packs the first ones too
        assert {layer.qweight_layout for layer in layers} == {kernels.cpu_int8_engine()}
    with torch.inference_mode():
        assert torch.equal(restored(mlp_inputs), result.model(mlp_inputs))


def test_validate_is_stored_in_info(mlp, mlp_inputs):
    result = quantize(mlp, bits=8, dynamic=True)
    validation = result.validate(mlp_inputs)
    assert validation.passed
    stored = result.info.metrics["validation"]
    assert stored["passed"] is True
    assert stored["output_sqnr_db"] == pytest.approx(validation.output_sqnr_db)


def test_result_keeps_a_reference_to_the_original(mlp):
    result = quantize(mlp, bits=8, dynamic=True)
    assert result.original is mlp
    assert "original=" not in repr(result)


def test_is_state_dict(mlp):
    assert quantize(mlp.state_dict(), bits=8, dynamic=True).is_state_dict
    assert not quantize(mlp, bits=8, dynamic=True).is_state_dict
