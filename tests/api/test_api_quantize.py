"""quantize(): modes, argument checking, inputs (module / state_dict / file), failures, progress."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mono_quant import ConfigurationError, InputError, QuantizationResult, UnsupportedFormatError, quantize
from mono_quant.modules import QuantizedLinear

from .conftest import ExplodingModel, UncopyableModel, make_mlp


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(1), b.detach().flatten(1), dim=-1).mean())


# -- the modes -----------------------------------------------------------------------------------
def test_dynamic_int8_returns_a_successful_result(mlp, mlp_inputs):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    result = quantize(mlp, bits=8, dynamic=True)

    assert isinstance(result, QuantizationResult)
    assert result.success is True and bool(result) is True
    assert result.errors == []
    assert result.info.selected_layers == ["0", "2", "4"]
    assert result.info.skipped_layers == []
    assert result.info.mode == "dynamic"
    assert result.info.bits == 8
    for index in (0, 2, 4):
        layer = result.model[index]
        assert isinstance(layer, QuantizedLinear)
        assert layer.state_dict()["qweight"].dtype == torch.int8
        assert layer.config.activation == "dynamic"
    with torch.inference_mode():
        assert _cosine(mlp(mlp_inputs), result.model(mlp_inputs)) > 0.999
    # the caller's model is untouched
    assert all(isinstance(mlp[i], nn.Linear) for i in (0, 2, 4))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram"])
def test_static_with_calibration_fills_info(mlp, calibration, mlp_inputs, observer):
    result = quantize(mlp, bits=8, calibration_data=calibration, observer_type=observer)

    assert result, result.errors
    info = result.info
    assert info.mode == "static"
    assert info.calibration_samples_used == 100
    assert info.observer_type == observer
    assert info.selected_layers == ["0", "2", "4"]
    assert info.dtype is torch.qint8
    for name in info.selected_layers:
        assert info.layer_configs[name]["activation"] == "static"
        assert result.model.get_submodule(name).input_scale.numel() == 1
    with torch.inference_mode():
        assert _cosine(mlp(mlp_inputs), result.model(mlp_inputs)) > 0.99


def test_static_num_calibration_samples_limits_the_data(mlp, calibration):
    result = quantize(mlp, calibration_data=calibration, num_calibration_samples=40, calibration_batch_size=16)
    assert result.info.calibration_samples_used == 40


def test_static_takes_a_list_of_batches(mlp, calibration):
    result = quantize(mlp, calibration_data=list(calibration.split(25)))
    assert result.info.calibration_samples_used == 100


def test_bits_4_is_group_wise_weight_only_without_data(mlp, mlp_inputs):
    result = quantize(mlp, bits=4)

    assert result, result.errors
    assert result.info.bits == 4
    assert result.info.group_size == 128
    assert result.info.symmetric is False  # int4 defaults to asymmetric
    layer = result.model[0]
    assert isinstance(layer, QuantizedLinear)
    assert layer.config.bits == 4 and layer.config.group_size == 128
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (128, 64)  # two per byte
    with torch.inference_mode():
        assert _cosine(mlp(mlp_inputs), result.model(mlp_inputs)) > 0.98


def test_bits_4_quantizes_layers_the_group_size_does_not_divide_with_a_partial_last_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(192, 128), nn.Linear(128, 8))
    result = quantize(model, bits=4)
    assert result.info.selected_layers == ["0", "1"]
    assert result.info.skip_reasons == {}
    assert result.model[0].weight_scale.shape == (128, 2)  # 128 + a partial group of 64
    x = torch.randn(4, 192)
    assert torch.nn.functional.cosine_similarity(result.model(x), model(x)).min() > 0.98


def test_bits_8_weight_only_needs_no_data(mlp):
    result = quantize(mlp, bits=8, weight_only=True)
    assert result.info.mode == "weight_only"
    assert result.model[0].config.activation == "none"


@pytest.mark.parametrize(
    ("kwargs", "dtype"),
    [
        ({}, torch.float16),
        ({"dtype": "float16"}, torch.float16),
        ({"dtype": "bf16"}, torch.bfloat16),
        ({"dtype": "bfloat16"}, torch.bfloat16),
    ],
    ids=["default-fp16", "float16", "bf16", "bfloat16"],
)
def test_bits_16_casts(mlp, mlp_inputs, kwargs, dtype):
    result = quantize(mlp, bits=16, **kwargs)

    assert result, result.errors
    assert result.info.mode == "cast"
    assert result.info.dtype is dtype
    assert result.info.bits == 16
    for index in (0, 2, 4):
        assert result.model[index].weight.dtype is dtype
    with torch.inference_mode():
        out = result.model(mlp_inputs)
    assert out.dtype is torch.float32  # callers keep their dtype
    assert _cosine(mlp(mlp_inputs), out) > 0.9999


def test_bits_16_rejects_an_integer_dtype(mlp):
    with pytest.raises(ConfigurationError, match="dtype='int8' is not supported"):
        quantize(mlp, bits=16, dtype="int8")


def test_include_and_exclude_select_layers(mlp):
    assert quantize(mlp, dynamic=True, include=["0", "2"]).info.selected_layers == ["0", "2"]
    result = quantize(mlp, dynamic=True, exclude=["4"])
    assert result.info.selected_layers == ["0", "2"]
    assert result.info.skipped_layers == ["4"]
    assert result.info.skip_reasons["4"]
    assert type(result.model[4]) is nn.Linear


# -- argument checking ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [5, 2, 32, 0, "8", True, None, 8.5], ids=repr)
def test_invalid_bits_raise_configuration_error_listing_valid_values(mlp, bits):
    with pytest.raises(ConfigurationError) as excinfo:
        quantize(mlp, bits=bits, dynamic=True)
    assert excinfo.value.message == f"bits={bits!r} is not supported"
    for valid in ("bits=4", "bits=8", "bits=16", "bf16"):
        assert valid in excinfo.value.suggestion


@pytest.mark.parametrize("scheme", ["foo", "Symmetric", "affine", ""], ids=repr)
def test_invalid_scheme_raises_configuration_error_listing_valid_values(mlp, scheme):
    with pytest.raises(ConfigurationError) as excinfo:
        quantize(mlp, bits=8, dynamic=True, scheme=scheme)
    assert excinfo.value.message == f"scheme={scheme!r} is not supported"
    assert "'symmetric'" in excinfo.value.suggestion and "'asymmetric'" in excinfo.value.suggestion


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_both_schemes_work(mlp, scheme):
    result = quantize(mlp, bits=8, dynamic=True, scheme=scheme)
    assert result.info.symmetric is (scheme == "symmetric")
    assert result.model[0].config.symmetric is (scheme == "symmetric")


def test_static_without_data_raises_input_error(mlp):
    with pytest.raises(InputError) as excinfo:
        quantize(mlp, bits=8)
    assert type(excinfo.value) is InputError
    assert excinfo.value.message == "static int8 quantization (dynamic=False) needs calibration data"
    assert "calibration_data" in excinfo.value.suggestion
    assert "dynamic=True" in excinfo.value.suggestion


def test_dynamic_must_be_a_bool(mlp):
    with pytest.raises(ConfigurationError, match="dynamic must be True or False, got 'yes'"):
        quantize(mlp, dynamic="yes")


@pytest.mark.parametrize(
    ("option", "close"),
    [("group_sise", "group_size"), ("observer", "observer_type"), ("excludes", "exclude")],
)
def test_unknown_option_names_close_matches(mlp, option, close):
    with pytest.raises(ConfigurationError) as excinfo:
        quantize(mlp, bits=8, dynamic=True, **{option: 1})
    assert excinfo.value.message.startswith(f"unknown option(s): {option!r} (did you mean")
    assert close in excinfo.value.message
    assert excinfo.value.suggestion.startswith("Valid options: ")


def test_unknown_option_without_close_match_still_lists_valid_ones(mlp):
    with pytest.raises(ConfigurationError) as excinfo:
        quantize(mlp, dynamic=True, banana=1)
    assert excinfo.value.message == "unknown option(s): 'banana'"
    for option in ("group_size", "observer_type", "include", "progress_callback"):
        assert option in excinfo.value.suggestion


GROUP_ERROR = "group_size must be a power of two from 16 to 1024, got "


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("group_size", 3, GROUP_ERROR + "3"),
        ("group_size", 0, GROUP_ERROR + "0"),
        ("group_size", -4, GROUP_ERROR + "-4"),
        ("group_size", "128", GROUP_ERROR + "'128'"),
        ("embedding_bits", 16, "embedding_bits=16 is not supported"),
        ("embedding_bits", 5, "embedding_bits=5 is not supported"),
        ("clip_search_steps", -1, "clip_search_steps must be an integer >= 0, got -1"),
    ],
    ids=["group-3", "group-0", "group-negative", "group-str", "embedding-16", "embedding-5", "clip-negative"],
)
@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_invalid_option_values_raise_for_modules_and_state_dicts(mlp, source, option, value, message):
    model = mlp if source == "module" else mlp.state_dict()
    with pytest.raises(ConfigurationError) as excinfo:
        quantize(model, bits=4, **{option: value})
    assert excinfo.value.message == message
    assert excinfo.value.suggestion


def test_invalid_activation_scheme(mlp, calibration):
    with pytest.raises(ConfigurationError, match="activation_scheme='centered' is not supported"):
        quantize(mlp, calibration_data=calibration, activation_scheme="centered")


def test_non_callable_progress_callback(mlp):
    with pytest.raises(ConfigurationError, match="progress_callback must be callable"):
        quantize(mlp, dynamic=True, progress_callback="print")


@pytest.mark.parametrize("model", [42, ["not", "a", "model", "object"], {}], ids=["int", "list", "empty-dict"])
def test_unusable_model_objects_raise_input_error(model):
    with pytest.raises(InputError) as excinfo:
        quantize(model, bits=8, dynamic=True)
    assert excinfo.value.suggestion


def test_state_dict_with_non_tensors_raises_input_error():
    with pytest.raises(InputError, match=r"\['epoch'\] are not tensors"):
        quantize({"fc.weight": torch.randn(4, 4), "epoch": 3}, dynamic=True)


def test_missing_file_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        quantize(tmp_path / "missing.safetensors", dynamic=True)


# -- state_dict and file inputs ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "mode", "qdtype"),
    [
        ({"bits": 8, "dynamic": True}, "state_dict_dynamic", torch.int8),
        ({"bits": 8, "weight_only": True}, "state_dict_weight_only", torch.int8),
        ({"bits": 4}, "state_dict_weight_only", torch.uint8),
        ({"bits": 16}, "state_dict_cast", None),
    ],
    ids=["int8-dynamic", "int8-weight-only", "int4", "fp16"],
)
def test_state_dict_input(mlp, kwargs, mode, qdtype):
    state = mlp.state_dict()
    result = quantize(state, **kwargs)

    assert result, result.errors
    assert result.is_state_dict
    assert result.info.mode == mode
    assert result.info.selected_layers == ["0", "2", "4"]
    assert set(result.layers) == {"0", "2", "4"}
    if qdtype is None:
        assert result.model["0.weight"].dtype is torch.float16
        assert result.layers["0"] == {"kind": "cast", "dtype": "float16"}
    else:
        assert result.model["0.qweight"].dtype is qdtype
        assert "0.weight" not in result.model
        assert result.layers["0"]["kind"] == "auto"
    # a cast casts the whole layer (as on modules); quantized layers keep their float bias
    assert torch.equal(result.model["0.bias"], state["0.bias"].to(result.model["0.bias"].dtype))
    assert result.model["0.bias"].dtype is (torch.float16 if qdtype is None else torch.float32)
    assert result.info.quantized_size_bytes < result.info.original_size_bytes


def test_state_dicts_apply_the_same_selection_options_as_modules(mlp):
    kwargs = {"bits": 8, "dynamic": True, "layer_types": ["linear"], "min_params": 1000}
    from_module = quantize(mlp, **kwargs)
    from_tensors = quantize(mlp.state_dict(), **kwargs)
    assert from_tensors.info.selected_layers == from_module.info.selected_layers
    assert from_tensors.info.skip_reasons == from_module.info.skip_reasons


def test_state_dicts_apply_per_tensor_scales(mlp):
    result = quantize(mlp.state_dict(), bits=8, dynamic=True, per_channel=False)
    assert not result.warnings
    scale = result.model["0.weight_scale"]
    assert torch.equal(scale, scale[:1].expand_as(scale))  # one scale, stored per channel


def test_state_dict_without_weights_warns():
    result = quantize({"scale": torch.ones(3)}, bits=8, dynamic=True)
    assert result
    assert any("no tensor was quantized" in w for w in result.warnings)


def test_static_on_a_state_dict_raises_input_error(mlp, calibration):
    with pytest.raises(InputError) as excinfo:
        quantize(mlp.state_dict(), bits=8, calibration_data=calibration)
    assert "has no forward" in excinfo.value.message
    assert "nn.Module" in excinfo.value.suggestion and "dynamic=True" in excinfo.value.suggestion


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("as_str", [True, False], ids=["str", "Path"])
def test_file_path_input(tmp_path, mlp, suffix, as_str):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(mlp.state_dict(), path)
    else:
        torch.save(mlp.state_dict(), path)
    result = quantize(str(path) if as_str else path, bits=8, dynamic=True)
    expected = quantize(mlp.state_dict(), bits=8, dynamic=True)

    assert result, result.errors
    assert result.is_state_dict
    assert result.model.keys() == expected.model.keys()
    assert all(torch.equal(result.model[k], expected.model[k]) for k in result.model)


def test_static_on_a_file_raises_input_error(tmp_path, mlp, calibration):
    path = tmp_path / "model.safetensors"
    save_file(mlp.state_dict(), path)
    with pytest.raises(InputError, match="has no forward"):
        quantize(path, bits=8, calibration_data=calibration)


def test_pickled_module_file_is_refused_unless_trusted(tmp_path, mlp):
    path = tmp_path / "whole.pt"
    torch.save(mlp, path)
    with pytest.raises(UnsupportedFormatError):
        quantize(path, bits=8, dynamic=True)
    result = quantize(path, bits=8, dynamic=True, trusted=True)
    assert result
    assert isinstance(result.model, nn.Module)
    assert isinstance(result.model[0], QuantizedLinear)


# -- failures ------------------------------------------------------------------------------------
def test_a_forward_that_fails_during_calibration_is_an_input_error_at_once():
    with pytest.raises(InputError) as excinfo:
        quantize(ExplodingModel(), bits=8, calibration_data=torch.randn(8, 16))
    assert excinfo.value.message == "the model failed on a calibration batch: RuntimeError: boom in forward"
    assert "model(x)" in excinfo.value.suggestion


def test_calibration_data_of_the_wrong_shape_is_an_input_error(mlp):
    with pytest.raises(InputError, match="the model failed on a calibration batch"):
        quantize(mlp, calibration_data=torch.randn(10, 7))


def test_a_failure_inside_quantization_comes_back_as_a_failed_result():
    model = UncopyableModel()
    result = quantize(model, bits=8, dynamic=True)  # must not raise

    assert result.success is False
    assert not result
    assert result.model is None
    assert len(result.errors) == 1
    assert result.errors[0].startswith("QuantizationError: could not copy the model")
    assert "deep-copied" in result.errors[0]
    assert result.info.dtype is torch.qint8
    assert isinstance(model.fc, nn.Linear)  # the original is untouched


# -- progress ------------------------------------------------------------------------------------
def _check_progress(events, stages):
    assert {stage for stage, _ in events} == set(stages)
    for stage in stages:
        fractions = [f for s, f in events if s == stage]
        assert fractions[0] == 0.0
        assert fractions[-1] == 1.0
        assert fractions == sorted(fractions)
        assert all(0.0 <= f <= 1.0 for f in fractions)


def test_progress_callback_static(mlp, calibration):
    events = []
    quantize(
        mlp, calibration_data=calibration, calibration_batch_size=25, progress_callback=lambda *e: events.append(e)
    )
    _check_progress(events, ["calibrate", "quantize"])
    # calibration reports come before quantization reports
    assert max(i for i, (s, _) in enumerate(events) if s == "calibrate") < events.index(("quantize", 0.0))
    assert len([e for e in events if e[0] == "calibrate"]) >= 4  # one per batch


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 8, "dynamic": True}, {"bits": 4}, {"bits": 16}],
    ids=["int8-dynamic", "int4", "fp16"],
)
def test_progress_callback_without_data(mlp, kwargs):
    events = []
    quantize(mlp, progress_callback=lambda stage, fraction: events.append((stage, fraction)), **kwargs)
    _check_progress(events, ["quantize"])


def test_progress_callback_state_dict(mlp):
    events = []
    quantize(mlp.state_dict(), bits=8, dynamic=True, progress_callback=lambda *e: events.append(e))
    _check_progress(events, ["quantize"])


def test_show_progress_draws_bars(mlp, calibration, capsys):
    result = quantize(mlp, calibration_data=calibration, show_progress=True)
    assert result
    err = capsys.readouterr().err
    assert "calibrate" in err
    assert "quantize" in err
    assert "3/3" in err  # three layers


def test_show_progress_on_a_state_dict(capsys):
    result = quantize(make_mlp().state_dict(), bits=4, show_progress=True)
    assert result
    assert "quantize" in capsys.readouterr().err


def test_activation_scheme_sets_dynamic_int8s_per_token_grid(mlp, tmp_path):
    """Dynamic int8 gives each token its own zero point unless ``activation_scheme='symmetric'``;
    the choice is in every layer's config and survives a save and load; a mode without int8
    activations refuses the option."""
    from mono_quant import load_quantized

    from .conftest import make_mlp

    asymmetric = quantize(mlp, bits=8, dynamic=True)
    symmetric = quantize(mlp, bits=8, dynamic=True, activation_scheme="symmetric")
    assert {c["activation_symmetric"] for c in asymmetric.info.layer_configs.values()} == {False}
    assert {c["activation_symmetric"] for c in symmetric.info.layer_configs.values()} == {True}
    x = torch.randn(4, 128).relu()
    with torch.inference_mode():
        assert not torch.equal(symmetric.model(x), asymmetric.model(x))
        restored = load_quantized(asymmetric.save(tmp_path / "a.safetensors"), make_mlp(seed=5))
        assert torch.equal(restored(x), asymmetric.model(x))
    with pytest.raises(ConfigurationError, match="activation_scheme") as info:
        quantize(mlp, bits=8, weight_only=True, activation_scheme="asymmetric")
    assert info.value.suggestion
