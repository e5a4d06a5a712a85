"""dynamic_quantize / static_quantize on whole models: accuracy, the caller's model left alone,
selection, calibration data shapes, QuantizationInfo, and errors with suggestions.

Accuracy is SQNR (dB) of the quantized model's output against the float model's, with floors
set a few dB under what each mode measured on these small random models.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mono_quant.api.exceptions import ConfigurationError, InputError, MonoQuantError
from mono_quant.core.config import QuantizationConfig
from mono_quant.core.quantizers import QuantizationInfo, dynamic_quantize, static_quantize
from mono_quant.core.schemes import sqnr
from mono_quant.modules import (
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedLSTM,
    QuantizedModule,
)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor], flags: dict[str, bool]) -> None:
    state = model.state_dict(keep_vars=True)
    assert set(state) == set(snapshot)
    for key, value in state.items():
        assert value.dtype == snapshot[key].dtype and value.device == snapshot[key].device, key
        assert torch.equal(value.detach(), snapshot[key]), f"{key} changed"
    for name, module in model.named_modules():
        assert module.training == flags[name], f"training flag of {name!r} changed"
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name!r}"
        assert not isinstance(module, QuantizedModule)


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 16, 16)


def _tokens(n: int = 16, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 50, (n, 12))


def _features(n: int = 64, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 32)


# -- dynamic: accuracy on an MLP, a CNN, an LSTM model ------------------------------------------------
MLP_MODES = {
    "int8-dynamic": ({"dtype": torch.qint8}, QuantizedLinear, 30.0),
    "int8-weight-only": ({"dtype": torch.qint8, "weight_only": True}, QuantizedLinear, 36.0),
    "int8-asym-per-tensor": ({"dtype": "int8", "symmetric": False, "per_channel": False}, QuantizedLinear, 28.0),
    "int4-g32": ({"dtype": "int4", "group_size": 32}, QuantizedLinear, 15.0),
    "int4-sym-g32": ({"dtype": torch.quint4x2, "group_size": 32, "symmetric": True}, QuantizedLinear, 13.0),
    "fp16": ({"dtype": torch.float16}, nn.Linear, 60.0),
    "bf16": ({"dtype": torch.bfloat16}, nn.Linear, 40.0),
}


@pytest.mark.parametrize("mode", list(MLP_MODES))
def test_dynamic_mlp(mlp, mode):
    kwargs, layer_type, min_sqnr = MLP_MODES[mode]
    x = _features()
    quantized, skipped = dynamic_quantize(mlp, **kwargs)
    assert skipped == []
    linears = [m for m in quantized.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    assert len(linears) == 3 and all(type(m) is layer_type for m in linears)
    out = quantized(x)
    assert out.dtype == torch.float32  # fp16/bf16 casts hand back the caller's dtype
    assert sqnr(mlp(x), out) > min_sqnr, sqnr(mlp(x), out)


def test_dynamic_int4_is_asymmetric_group_128_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 16))
    quantized, info = dynamic_quantize(model, dtype="int4", return_info=True)
    config = quantized[0].config
    assert (config.bits, config.symmetric, config.group_size) == (4, False, 128)
    assert info.mode == "weight_only" and info.group_size == 128 and info.symmetric is False


@pytest.mark.parametrize(
    "kwargs, min_sqnr",
    [({"dtype": torch.qint8}, 30.0), ({"dtype": torch.qint8, "weight_only": True}, 30.0), ({"dtype": "bf16"}, 30.0)],
    ids=["int8", "int8-weight-only", "bf16"],
)
def test_dynamic_cnn(cnn, kwargs, min_sqnr):
    x = _images()
    quantized, skipped = dynamic_quantize(cnn, **kwargs)
    assert skipped == []
    if kwargs["dtype"] == torch.qint8:
        assert isinstance(quantized.features[0], QuantizedConv2d)
        assert isinstance(quantized.features[3], QuantizedConv2d)
        assert isinstance(quantized.head, QuantizedLinear)
    assert isinstance(quantized.features[1], nn.BatchNorm2d)  # stays float, with its statistics
    assert torch.equal(quantized.features[1].running_mean, cnn.features[1].running_mean)
    assert sqnr(cnn(x), quantized(x)) > min_sqnr


def test_dynamic_int4_on_cnn_stores_convolutions_int8_with_a_warning(cnn):
    quantized, info = dynamic_quantize(cnn, dtype="int4", group_size=32, return_info=True)
    assert isinstance(quantized.features[0], QuantizedConv2d) and quantized.features[0].config.bits == 8
    assert any("features.0" in w and "int4 is not available" in w for w in info.warnings)
    assert info.skip_reasons == {}  # the head's in_features=32 is divisible by 32


def test_dynamic_lstm_model(lstm_model):
    tokens = _tokens()
    quantized, skipped = dynamic_quantize(lstm_model, dtype=torch.qint8)
    assert skipped == []
    assert isinstance(quantized.embedding, QuantizedEmbedding)
    assert isinstance(quantized.lstm, QuantizedLSTM)
    assert isinstance(quantized.head, QuantizedLinear)
    assert quantized.lstm.weight_hh_l1_q.dtype == torch.int8
    assert sqnr(lstm_model(tokens), quantized(tokens)) > 28


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_cast_of_an_lstm_model(lstm_model, dtype):
    """Regression: the cast hooks read ``module.weight``, which an LSTM does not have."""
    tokens = _tokens()
    quantized, skipped = dynamic_quantize(lstm_model, dtype=dtype)
    assert skipped == []
    assert quantized.lstm.weight_ih_l0.dtype == dtype
    out = quantized(tokens)
    assert sqnr(lstm_model(tokens), out.float()) > 25


def test_half_cast_of_an_lstm_with_packed_input_and_initial_state():
    torch.manual_seed(0)
    model = nn.LSTM(8, 16, batch_first=True)
    quantized, _ = dynamic_quantize(model, dtype=torch.float16)
    x = torch.randn(3, 5, 8)
    state = (torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    out, (h, c) = quantized(x, state)
    assert out.dtype == h.dtype == c.dtype == torch.float32
    expected, _ = model(x, state)
    assert sqnr(expected, out) > 40
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    out_packed, _ = quantized(packed)
    assert out_packed.data.dtype == torch.float32
    assert sqnr(model(packed)[0].data, out_packed.data) > 40


# -- the caller's model is left as it was ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["dynamic-int8", "dynamic-int4", "dynamic-fp16", "static"])
def test_callers_model_is_unchanged(cnn, how):
    cnn.train()
    cnn.features[1].eval()  # a frozen BatchNorm inside a model in training mode
    for p in cnn.head.parameters():
        p.requires_grad_(False)
    snapshot, flags = _snapshot(cnn), _flags(cnn)
    if how == "static":
        quantized, _ = static_quantize(cnn, _images(32))
    else:
        dtype = {"dynamic-int8": torch.qint8, "dynamic-int4": "int4", "dynamic-fp16": torch.float16}[how]
        quantized, _ = dynamic_quantize(cnn, dtype=dtype, group_size=32)
    _assert_unchanged(cnn, snapshot, flags)
    assert [p.requires_grad for p in cnn.parameters()] == [
        not name.startswith("head.") for name, _ in cnn.named_parameters()
    ]
    assert not quantized.training
    # the result shares no float storage with the original: changing one leaves the other alone
    originals = {t.data_ptr() for t in list(cnn.parameters()) + list(cnn.buffers())}
    for tensor in list(quantized.parameters()) + list(quantized.buffers()):
        assert tensor.data_ptr() not in originals


def test_static_calibration_does_not_update_batchnorm_statistics(cnn):
    cnn.train()  # calibration must run in eval mode even when the caller's model is training
    snapshot, flags = _snapshot(cnn), _flags(cnn)
    static_quantize(cnn, _images(32, seed=5) * 3 + 1)
    _assert_unchanged(cnn, snapshot, flags)


def test_static_leaves_no_hooks_when_a_batch_fails(mlp):
    snapshot, flags = _snapshot(mlp), _flags(mlp)
    with pytest.raises(InputError):
        static_quantize(mlp, [torch.randn(4, 32), torch.randn(4, 7)])
    _assert_unchanged(mlp, snapshot, flags)


# -- selection through the quantizers -------------------------------------------------------------------
def test_layer_types_include_exclude_and_reasons(lstm_model):
    quantized, info = dynamic_quantize(lstm_model, layer_types=["linear", "lstm"], exclude=["head"], return_info=True)
    assert type(quantized.embedding) is nn.Embedding  # not a candidate: not in layer_types
    assert type(quantized.head) is nn.Linear
    assert isinstance(quantized.lstm, QuantizedLSTM)
    assert info.selected_layers == ["lstm"]
    assert info.skipped_layers == ["head"]
    assert info.skip_reasons == {"head": "matched an exclude pattern"}


def test_include_regex(mlp):
    quantized, skipped = dynamic_quantize(mlp, include=[r"re:[02]"])
    assert isinstance(quantized[0], QuantizedLinear) and isinstance(quantized[2], QuantizedLinear)
    assert type(quantized[4]) is nn.Linear
    assert skipped == ["4"]


def test_min_params(mlp):
    quantized, info = dynamic_quantize(mlp, min_params=1000, return_info=True)
    assert info.selected_layers == ["0", "2"]  # weights of 2048 and 4096 parameters; "4" has 640
    assert info.skip_reasons == {"4": "640 parameters < min_params=1000"}
    assert type(quantized[4]) is nn.Linear


def test_int4_gives_layers_the_group_size_does_not_divide_a_partial_last_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    quantized, info = dynamic_quantize(model, dtype="int4", group_size=32, return_info=True)
    assert info.selected_layers == ["0", "2"]
    assert info.skip_reasons == {}
    assert quantized[2].weight_scale.shape == (8, 2)  # a group of 32 and a partial one of 16
    x = torch.randn(4, 64)
    assert sqnr(model(x), quantized(x)) > 15


def test_unsupported_layers_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    quantized, info = dynamic_quantize(model, return_info=True)
    assert info.selected_layers == ["2"]
    assert "padding_mode='circular'" in info.skip_reasons["0"]
    x = torch.randn(2, 3, 8, 8)
    assert sqnr(model(x), quantized(x)) > 30


@pytest.mark.parametrize("dtype", [torch.qint8, "int4", torch.float16], ids=str)
def test_a_bare_layer_as_the_model(dtype):
    """Regression: a model that is itself a quantizable layer came back as its meta-tensor copy."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    quantized, info = dynamic_quantize(layer, dtype=dtype, group_size=32, return_info=True)
    assert info.selected_layers == [""]
    x = torch.randn(4, 64)
    assert sqnr(layer(x), quantized(x)) > 15
    assert layer.weight.device.type == "cpu"
    lstm = nn.LSTM(8, 8)
    quantized_lstm, _ = dynamic_quantize(lstm)
    assert isinstance(quantized_lstm, QuantizedLSTM)
    seq = torch.randn(5, 2, 8)
    assert sqnr(lstm(seq)[0], quantized_lstm(seq)[0]) > 30
    static, _ = static_quantize(layer, x)
    assert isinstance(static, QuantizedLinear) and static.config.activation == "static"


def test_nothing_selected_warns(mlp):
    quantized, info = dynamic_quantize(mlp, layer_types=["conv2d"], return_info=True)
    assert info.selected_layers == [] and any("no layer was quantized" in w for w in info.warnings)
    x = _features()
    assert torch.equal(quantized(x), mlp(x))


# -- static: calibration really sets the activation qparams ----------------------------------------------
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram"])
def test_static_mlp(mlp, observer):
    x = _features(128)
    quantized, info = static_quantize(mlp, x, observer_type=observer)
    assert info.mode == "static" and info.observer_type == observer
    assert info.calibration_samples_used == 128
    for index in (0, 2, 4):
        layer = quantized[index]
        assert layer.config.activation == "static"
        assert layer.input_scale.dtype == torch.float32 and layer.input_scale.numel() == 1
    assert sqnr(mlp(_features(32, seed=9)), quantized(_features(32, seed=9))) > 22


def test_static_cnn(cnn):
    quantized, info = static_quantize(cnn, _images(32), observer_type="histogram")
    assert isinstance(quantized.features[0], QuantizedConv2d) and quantized.features[0].config.activation == "static"
    assert sqnr(cnn(_images(8, seed=3)), quantized(_images(8, seed=3))) > 20


def test_static_lstm_model(lstm_model):
    quantized, info = static_quantize(lstm_model, _tokens(32))
    assert isinstance(quantized.lstm, QuantizedLSTM) and quantized.lstm.config.activation == "none"
    assert isinstance(quantized.embedding, QuantizedEmbedding)
    assert quantized.head.config.activation == "static"
    assert info.selected_layers == ["embedding", "lstm", "head"]
    assert sqnr(lstm_model(_tokens(8, seed=4)), quantized(_tokens(8, seed=4))) > 20


def test_other_calibration_data_gives_other_scales_and_outputs(mlp):
    narrow, _ = static_quantize(mlp, _features(64, seed=1) * 0.5)
    wide, _ = static_quantize(mlp, _features(64, seed=2) * 4.0)
    assert wide[0].input_scale > narrow[0].input_scale * 4
    x = _features(16, seed=3) * 0.5
    assert not torch.allclose(narrow(x), wide(x))
    assert sqnr(mlp(x), narrow(x)) > sqnr(mlp(x), wide(x))  # the matching calibration wins


def test_input_scale_follows_the_observed_range(mlp):
    x = _features(64)
    quantized, _ = static_quantize(mlp, x, observer_type="minmax")
    lo, hi = x.min().item(), x.max().item()
    assert quantized[0].input_scale.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    symmetric, _ = static_quantize(mlp, x, observer_type="minmax", activation_symmetric=True)
    assert symmetric[0].input_scale.item() == pytest.approx(max(-lo, hi) / 127, rel=1e-5)
    assert symmetric[0].input_zero_point.item() == 0


def test_layer_without_calibration_data_falls_back_to_weight_only():
    model = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    quantized, info = static_quantize(model, torch.randn(8, 8))
    assert quantized["used"].config.activation == "static"
    assert quantized["unused"].config.activation == "none"
    assert any("unused" in w and "weight-only" in w for w in info.warnings)


# -- calibration data in every documented shape -----------------------------------------------------------
class _DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, scale: torch.Tensor) -> None:
        self.x, self.scale = x, scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "scale": self.scale[i]}


def _first_layer_qparams(model: nn.Module, data, **kwargs) -> tuple[float, int, int]:
    quantized, info = static_quantize(model, data, observer_type="minmax", **kwargs)
    return quantized.fc2.input_scale.item(), quantized.fc2.input_zero_point.item(), info.calibration_samples_used


def test_calibration_data_forms_agree(two_input_model):
    torch.manual_seed(0)
    x, scale = torch.randn(48, 32), torch.rand(48, 1) * 2
    chunks = list(zip(x.split(16), scale.split(16), strict=True))
    forms = {
        "list-of-tuples": [(xs, ss) for xs, ss in chunks],
        "list-of-dicts": [{"x": xs, "scale": ss} for xs, ss in chunks],
        "dataloader-of-tuples": DataLoader(TensorDataset(x, scale), batch_size=16),
        "dataloader-of-dicts": DataLoader(_DictDataset(x, scale), batch_size=16),
        "generator": ((xs, ss) for xs, ss in chunks),
    }
    results = {name: _first_layer_qparams(two_input_model, data) for name, data in forms.items()}
    expected = results.pop("list-of-tuples")
    assert expected[2] == 48
    for name, got in results.items():
        assert got == expected, name


def test_calibration_tensor_and_list_of_tensors_agree(mlp):
    x = _features(48)
    as_tensor, info_tensor = static_quantize(mlp, x, observer_type="minmax")
    as_list, info_list = static_quantize(mlp, list(x.split(10)), observer_type="minmax")
    as_loader, info_loader = static_quantize(mlp, DataLoader(TensorDataset(x), batch_size=7), observer_type="minmax")
    for other in (as_list, as_loader):
        assert torch.equal(other[0].input_scale, as_tensor[0].input_scale)
        for index in (2, 4):  # hidden activations: matmuls of other batch sizes round differently
            torch.testing.assert_close(other[index].input_scale, as_tensor[index].input_scale, rtol=1e-5, atol=0)
    assert info_tensor.calibration_samples_used == info_list.calibration_samples_used == 48
    assert info_loader.calibration_samples_used == 48


@pytest.mark.parametrize("form", ["tensor", "list", "dataloader"])
def test_num_calibration_samples_is_respected(mlp, form):
    x = _features(100)
    x[40:] *= 50  # samples past the limit would blow up the range if they were seen
    data = {
        "tensor": x,
        "list": list(x.split(16)),
        "dataloader": DataLoader(TensorDataset(x), batch_size=16),
    }[form]
    quantized, info = static_quantize(mlp, data, num_calibration_samples=40, observer_type="minmax")
    assert info.calibration_samples_used == 40
    reference, _ = static_quantize(mlp, x[:40], observer_type="minmax")
    assert torch.equal(quantized[0].input_scale, reference[0].input_scale)


def test_fewer_samples_than_asked_uses_all(mlp):
    _, info = static_quantize(mlp, _features(20), num_calibration_samples=1000)
    assert info.calibration_samples_used == 20


# -- QuantizationInfo ----------------------------------------------------------------------------------------
def test_quantization_info_fields(mlp):
    _, info = static_quantize(mlp, _features(64), symmetric=False, observer_type="histogram")
    assert isinstance(info, QuantizationInfo)
    assert info.selected_layers == ["0", "2", "4"] and info.skipped_layers == []
    assert info.calibration_samples_used == 64
    assert info.dtype == torch.qint8 and info.bits == 8 and info.symmetric is False
    assert info.warnings == []
    assert info.layer_configs["2"]["kind"] == "QuantizedLinear" and info.layer_configs["2"]["activation"] == "static"
    assert info.original_size_bytes == sum(p.numel() * 4 for p in mlp.parameters())
    assert 3.0 < info.compression_ratio < 4.0  # int8 weights, fp32 biases and scales
    assert info.duration_s > 0
    data = info.to_dict()
    json.dumps(data)
    assert data["dtype"] == "qint8" and data["bits"] == 8 and data["compression_ratio"] == info.compression_ratio


def test_dynamic_return_info_and_compression(mlp):
    _, info = dynamic_quantize(mlp, dtype="int4", group_size=32, return_info=True)
    assert info.mode == "weight_only" and info.bits == 4
    assert info.compression_ratio > 5.0
    _, info = dynamic_quantize(mlp, dtype=torch.float16, return_info=True)
    assert info.mode == "cast" and info.compression_ratio == pytest.approx(2.0)
    assert info.layer_configs["0"] == {"kind": "cast", "dtype": "float16"}


def test_config_object_is_accepted(mlp):
    config = QuantizationConfig(dtype="int8", symmetric=False, observer_type="histogram", num_calibration_samples=32)
    quantized, info = static_quantize(mlp, _features(64), config=config)
    assert info.calibration_samples_used == 32 and info.observer_type == "histogram" and info.symmetric is False
    assert quantized[0].weight_zero_point is not None


def test_progress_callback_reports_each_stage(mlp):
    seen: list[tuple[str, float]] = []
    static_quantize(mlp, _features(64), calibration_batch_size=16, progress_callback=lambda s, f: seen.append((s, f)))
    stages = [stage for stage, _ in seen]
    assert stages[0] == "calibrate" and stages[-1] == "quantize"
    for stage in ("calibrate", "quantize"):
        fractions = [f for s, f in seen if s == stage]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len([1 for s, _ in seen if s == "calibrate"]) >= 5  # 4 batches + start


# -- errors: the documented hierarchy, with suggestions ---------------------------------------------------
def _raises(cls, match, call):
    with pytest.raises(cls, match=match) as info:
        call()
    assert isinstance(info.value, MonoQuantError)
    assert info.value.suggestion and info.value.suggestion in str(info.value)
    return info.value


def test_not_a_model(mlp):
    _raises(InputError, "expected a torch.nn.Module, got OrderedDict", lambda: dynamic_quantize(mlp.state_dict()))
    _raises(InputError, "expected a torch.nn.Module, got str", lambda: static_quantize("model.pt", _features()))


@pytest.mark.parametrize(
    "kwargs, match, in_suggestion",
    [
        ({"dtype": "int3"}, "unsupported quantization dtype 'int3'", "int4"),
        ({"dtype": torch.float32}, "unsupported quantization dtype", "bfloat16"),
        ({"group_size": 48, "dtype": "int4"}, "group_size must be a power of two", "128"),
        ({"symmetric": "no"}, "symmetric must be True or False", "symmetric=True"),
        ({"layer_types": ["linear", "transformer"]}, "unknown layer type", "embedding"),
        ({"include": ["re:[unclosed"]}, "invalid regular expression", "glob"),
        ({"min_params": -5}, "min_params must be a non-negative integer", "min_params=0"),
        ({"config": {"dtype": "int8"}}, "config must be a QuantizationConfig", "QuantizationConfig"),
    ],
    ids=["dtype", "float32", "group_size", "symmetric", "layer_types", "regex", "min_params", "config"],
)
def test_dynamic_bad_arguments(mlp, kwargs, match, in_suggestion):
    error = _raises(ConfigurationError, match, lambda: dynamic_quantize(mlp, **kwargs))
    assert in_suggestion in error.suggestion


@pytest.mark.parametrize(
    "kwargs, match, in_suggestion",
    [
        ({"observer_type": "entropy"}, "observer_type='entropy' is not supported", "'histogram'"),
        ({"dtype": "int4"}, "static quantization .* needs int8 weights", "dynamic_quantize"),
        ({"dtype": torch.float16}, "static quantization .* needs int8 weights", "dynamic_quantize"),
        ({"num_calibration_samples": 0}, "num_calibration_samples must be an integer >= 1", "128"),
        ({"exclude": 3}, "exclude must be a string or a list of strings", "re:"),
    ],
    ids=["observer", "int4", "fp16", "num_samples", "exclude"],
)
def test_static_bad_arguments(mlp, kwargs, match, in_suggestion):
    error = _raises(ConfigurationError, match, lambda: static_quantize(mlp, _features(), **kwargs))
    assert in_suggestion in error.suggestion


@pytest.mark.parametrize(
    "data, match",
    [
        (None, "needs calibration data, got None"),
        ([], "calibration_data is empty"),
        (torch.empty(0, 32), "calibration tensor has no samples"),
        (42, "calibration_data of type int is not iterable"),
        (["not a tensor"], "holds no tensor"),
    ],
    ids=["none", "empty-list", "empty-tensor", "int", "strings"],
)
def test_static_bad_calibration_data(mlp, data, match):
    _raises(InputError, match, lambda: static_quantize(mlp, data))


def test_calibration_batch_the_model_rejects(mlp):
    error = _raises(
        InputError, "the model failed on a calibration batch", lambda: static_quantize(mlp, torch.randn(8, 5))
    )
    assert "model(*batch)" in error.suggestion
    assert isinstance(error.__cause__, RuntimeError)


def test_nan_activations_during_calibration(mlp):
    x = _features()
    x[3, 5] = float("nan")
    _raises(InputError, "NaN or Inf", lambda: static_quantize(mlp, x))
