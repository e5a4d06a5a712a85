"""QuantizedLinear: storage, each forward path against an independent fp32 reference, round trip.

Tolerances: a path that computes exactly what the reference does (up to fp32 accumulation order)
is compared with allclose; comparisons against the *float* layer use SQNR in dB.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedLinear, build_quantized_module, packed_together

IN, OUT = 64, 48

WEIGHT_CONFIGS = {
    "int8-sym": LayerQuantConfig(bits=8, symmetric=True),
    "int8-asym": LayerQuantConfig(bits=8, symmetric=False),
    "int8-per-tensor": LayerQuantConfig(bits=8, symmetric=True, per_channel=False),
    "int8-asym-per-tensor": LayerQuantConfig(bits=8, symmetric=False, per_channel=False),
    "int8-group-32": LayerQuantConfig(bits=8, symmetric=True, group_size=32),
    "int4-asym-g32": LayerQuantConfig(bits=4, symmetric=False, group_size=32),
    "int4-sym-g32": LayerQuantConfig(bits=4, symmetric=True, group_size=32),
    "int4-asym-g64-clip": LayerQuantConfig(bits=4, symmetric=False, group_size=64, clip_search_steps=8),
}
# SQNR of the layer's output against the float layer, well under what each grid gives here
# (measured: int8 per channel ~41 dB, per tensor ~39 dB, int4 g32 ~19 dB).
MIN_SQNR_VS_FLOAT = {8: 33.0, 4: 15.0}


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT)
    with torch.no_grad():  # uneven rows, so per-channel and per-tensor scales really differ
        layer.weight.mul_(torch.linspace(0.2, 3.0, OUT).unsqueeze(1))
    return layer


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 7, IN)  # leading dims are kept


# -- storage ----------------------------------------------------------------------------------------
def test_int8_stores_int8_weights_and_per_channel_scales(linear):
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8, symmetric=True))
    # in memory the weight may live in a kernel's packed form; the documented layout is int8 [N, K]
    weight = layer._canonical_qweight()
    assert weight.dtype == torch.int8 and weight.shape == (OUT, IN)
    assert layer.kernel_nbytes() == 0  # packed on the first forward (see below)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (OUT,)
    assert layer.weight_zero_point is None
    assert "weight" not in dict(layer.named_parameters()) and list(layer.parameters()) == []
    state = layer.state_dict()
    assert state["qweight"].dtype == torch.int8 and state["qweight"].shape == (OUT, IN)
    assert set(state) == {"qweight", "weight_scale", "bias"}


def test_int8_asymmetric_stores_int8_zero_points(linear):
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8, symmetric=False))
    assert layer.weight_zero_point.dtype == torch.int8 and layer.weight_zero_point.shape == (OUT,)


def test_per_tensor_uses_one_scale(linear):
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8, per_channel=False))
    assert layer.weight_scale.shape == (OUT,)
    assert torch.unique(layer.weight_scale).numel() == 1
    assert layer.weight_scale[0].item() == pytest.approx(linear.weight.abs().max().item() / 127)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_packs_two_values_per_byte(linear, symmetric):
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=4, symmetric=symmetric, group_size=32))
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (OUT, IN // 2)
    assert layer.weight_scale.shape == (OUT, IN // 32)
    assert layer.weight_zero_point.dtype == torch.uint8 and layer.weight_zero_point.shape == (OUT, IN // 32)
    assert layer.state_dict()["qweight"].numel() * 2 == linear.weight.numel()
    if symmetric:
        assert (layer.weight_zero_point == 8).all()


def test_dequantized_weight_is_close_to_the_float_weight(linear):
    for name, config in WEIGHT_CONFIGS.items():
        layer = QuantizedLinear.from_float(linear, config)
        assert sqnr(linear.weight, layer.dequantized_weight()) > MIN_SQNR_VS_FLOAT[config.bits], name


# -- forward against references ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(WEIGHT_CONFIGS))
def test_weight_only_matches_dequantized_reference(linear, x, name):
    layer = QuantizedLinear.from_float(linear, WEIGHT_CONFIGS[name])
    out = layer(x)
    reference = F.linear(x, layer.dequantized_weight(), linear.bias)
    assert out.shape == (5, 7, OUT) and out.dtype == torch.float32
    # weight-only keeps activations at ~16-bit precision (two int8 terms): far above the weights' error
    assert sqnr(reference, out) > 70, sqnr(reference, out)
    assert sqnr(linear(x), out) > MIN_SQNR_VS_FLOAT[WEIGHT_CONFIGS[name].bits]


@pytest.mark.parametrize("tokens", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_dynamic_matches_per_token_reference(ref, linear, x, symmetric, per_channel, tokens):
    config = LayerQuantConfig(
        bits=8,
        symmetric=symmetric,
        per_channel=per_channel,
        activation="dynamic",
        activation_symmetric=tokens == "symmetric",
    )
    layer = QuantizedLinear.from_float(linear, config)
    out = layer(x)
    x2d = x.reshape(-1, IN)
    fake = ref.per_token if tokens == "symmetric" else ref.per_token_asymmetric
    reference = F.linear(fake(x2d), layer.dequantized_weight(), linear.bias).reshape(out.shape)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    # the activations' rounding does show: dynamic is not weight-only
    weight_only = F.linear(x, layer.dequantized_weight(), linear.bias)
    assert not torch.allclose(out, weight_only, atol=1e-5)
    assert sqnr(linear(x), out) > 30


@pytest.mark.parametrize("activation_symmetric", [False, True], ids=["asym-act", "sym-act"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym-weight", "asym-weight"])
def test_static_matches_fixed_qparam_reference(ref, linear, x, symmetric, activation_symmetric):
    scale, zero_point = torch.tensor(0.03), torch.tensor(0 if activation_symmetric else 7, dtype=torch.int32)
    config = LayerQuantConfig(
        bits=8, symmetric=symmetric, activation="static", activation_symmetric=activation_symmetric
    )
    layer = QuantizedLinear.from_float(linear, config, input_qparams=(scale, zero_point))
    out = layer(x)
    x_hat = ref.static(x, scale, zero_point.float(), activation_symmetric)
    reference = F.linear(x_hat, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_static_clips_inputs_outside_the_calibrated_range(linear):
    layer = QuantizedLinear.from_float(
        linear,
        LayerQuantConfig(bits=8, activation="static"),
        input_qparams=(torch.tensor(1.0 / 127), torch.tensor(0, dtype=torch.int32)),
    )
    small = torch.full((1, IN), 0.5)
    big = torch.full((1, IN), 5.0)
    torch.testing.assert_close(layer(big), layer(torch.full((1, IN), 127 / 127)), rtol=0, atol=0)
    assert sqnr(linear(small), layer(small)) > 30


def test_static_output_depends_on_the_input_qparams(linear, x):
    config = LayerQuantConfig(bits=8, activation="static")
    zero = torch.tensor(0, dtype=torch.int32)
    fine = QuantizedLinear.from_float(linear, config, input_qparams=(torch.tensor(0.03), zero))
    coarse = QuantizedLinear.from_float(linear, config, input_qparams=(torch.tensor(0.3), zero))
    assert not torch.allclose(fine(x), coarse(x))
    assert sqnr(linear(x), fine(x)) > sqnr(linear(x), coarse(x)) + 10


@pytest.mark.parametrize("shape", [(13, 7), (3, 5), (1, 1), (72, 10)], ids=str)
@pytest.mark.parametrize("activation", ["none", "dynamic"])
def test_odd_shapes_and_batch_sizes(shape, activation):
    torch.manual_seed(2)
    linear = nn.Linear(*shape)
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8, activation=activation))
    for rows in (1, 3, 33):
        x = torch.randn(rows, shape[0])
        assert sqnr(linear(x), layer(x)) > 25
    assert layer(torch.randn(shape[0])).shape == (shape[1],)  # 1-D input
    assert layer(torch.randn(0, shape[0])).shape == (0, shape[1])


def test_no_bias(x):
    torch.manual_seed(3)
    linear = nn.Linear(IN, OUT, bias=False)
    for config in (LayerQuantConfig(bits=8), LayerQuantConfig(bits=4, group_size=32)):
        layer = QuantizedLinear.from_float(linear, config)
        assert layer.bias is None
        assert sqnr(linear(x), layer(x)) > MIN_SQNR_VS_FLOAT[config.bits]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_input_gives_same_dtype_output(linear, x, dtype):
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8, activation="dynamic"))
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    assert sqnr(linear(x), out.float()) > 25


def test_from_float_does_not_touch_the_float_layer(linear):
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    QuantizedLinear.from_float(linear, LayerQuantConfig(bits=4, group_size=32, clip_search_steps=8))
    for key, value in linear.state_dict().items():
        assert torch.equal(value, before[key])


# -- state_dict round trip -----------------------------------------------------------------------------
ROUND_TRIP_CONFIGS = {
    **WEIGHT_CONFIGS,
    "int8-dynamic": LayerQuantConfig(bits=8, activation="dynamic"),
    "int8-asym-dynamic": LayerQuantConfig(bits=8, symmetric=False, activation="dynamic"),
    "int8-static": LayerQuantConfig(bits=8, activation="static"),
    "int8-asym-static-sym-act": LayerQuantConfig(
        bits=8, symmetric=False, activation="static", activation_symmetric=True
    ),
    "int4-dynamic": LayerQuantConfig(bits=4, group_size=32, activation="dynamic"),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_CONFIGS))
@pytest.mark.parametrize("target", ["fresh", "meta"])
def test_state_dict_round_trip_is_bitwise_identical(ref, linear, x, name, target):
    config = ROUND_TRIP_CONFIGS[name]
    extra = {}
    if config.activation == "static":
        extra["input_qparams"] = (torch.tensor(0.021), torch.tensor(-3, dtype=torch.int32))
    layer = QuantizedLinear.from_float(linear, config, **extra)
    if target == "meta":
        with torch.device("meta"):
            shell = nn.Linear(IN, OUT)
    else:
        torch.manual_seed(99)
        shell = nn.Linear(IN, OUT)  # other weights: nothing may leak from the float module
    restored = ref.rebuild(layer, shell)
    assert type(restored) is QuantizedLinear and restored.config == layer.config
    assert torch.equal(restored(x), layer(x))
    for key, value in layer.state_dict().items():
        assert restored.state_dict()[key].dtype == value.dtype
        assert torch.equal(restored.state_dict()[key], value), key


def test_empty_like_before_loading_differs(linear, x):
    """Guards the round-trip test: an empty layer really is empty until load_state_dict."""
    layer = QuantizedLinear.from_float(linear, LayerQuantConfig(bits=8))
    empty = build_quantized_module(nn.Linear(IN, OUT), LayerQuantConfig(bits=8))
    assert not torch.equal(empty(x), layer(x))


def test_build_quantized_module_refuses_a_mismatched_kind():
    with pytest.raises(ConfigurationError, match="cannot rebuild") as info:
        build_quantized_module(nn.Linear(4, 4), LayerQuantConfig(), kind="QuantizedConv2d")
    assert "same model architecture" in info.value.suggestion
    with pytest.raises(ConfigurationError, match="LayerNorm"):
        build_quantized_module(nn.LayerNorm(4), LayerQuantConfig())


# -- configuration errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 4}, "need a group_size"),
        ({"bits": 4, "group_size": 1}, "group_size must be an integer >= 2"),
        ({"activation": "per_token"}, "unknown activation mode"),
    ],
    ids=["bits", "int4-no-group", "group-size", "activation"],
)
def test_layer_config_validates(kwargs, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        LayerQuantConfig(**kwargs)
    assert info.value.suggestion and info.value.suggestion in str(info.value)


@pytest.mark.parametrize("activation", ["dynamic", "none", "static"])
def test_int8_packing_waits_for_the_first_forward(int8_engine, activation):
    """int8 weights are packed for the CPU's int8 engine on the first forward, not at
    construction (the AMX reorder costs more than quantizing): before it the layer holds the
    documented int8 weight, after it the packed one, and outputs and state_dict are the same
    either way."""
    if int8_engine is None:
        pytest.skip("nothing to pack without an int8 engine")
    torch.manual_seed(0)
    float_layer = nn.Linear(IN, OUT)
    qparams = (torch.tensor(0.05), torch.tensor(3, dtype=torch.int32))
    config = LayerQuantConfig(bits=8, symmetric=True, activation=activation)
    layer = QuantizedLinear.from_float(float_layer, config, input_qparams=qparams if activation == "static" else None)
    assert layer.qweight_layout == "packed" and layer.qweight.numel() == IN * OUT  # nothing packed yet
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    x = torch.randn(5, IN)
    first = layer(x)
    assert layer.qweight_layout == int8_engine and layer.qweight.numel() == 0  # held once, packed
    assert layer.kernel_nbytes() >= IN * OUT
    torch.testing.assert_close(layer(x), first)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    fresh = QuantizedLinear.from_float(float_layer, config, input_qparams=qparams if activation == "static" else None)
    fresh.load_state_dict(after)
    torch.testing.assert_close(fresh(x), first)


def _dynamic_int8_layers(count: int) -> list[QuantizedLinear]:
    torch.manual_seed(0)
    config = LayerQuantConfig(bits=8, symmetric=True, activation="dynamic")
    return [QuantizedLinear.from_float(nn.Linear(IN, IN), config) for _ in range(count)]


def test_layers_built_together_pack_together_on_the_first_forward(int8_engine):
    """The first forward of any layer of a ``packed_together()`` group packs every member
    still waiting (side by side on threads), with the outputs of layers packed alone; a layer
    built outside the group, and a copy of a member, wait for their own first forward."""
    if int8_engine is None:
        pytest.skip("nothing to pack without an int8 engine")
    alone = _dynamic_int8_layers(4)
    with packed_together():
        group = _dynamic_int8_layers(4)
    outside = _dynamic_int8_layers(1)[0]
    copied = copy.deepcopy(group[3])
    assert all(layer.qweight_layout == "packed" for layer in [*group, outside, copied])
    x = torch.randn(3, IN)
    out = group[2](x)  # any member, not only the first built
    assert [layer.qweight_layout for layer in group] == [int8_engine] * 4
    assert outside.qweight_layout == copied.qweight_layout == "packed"
    torch.testing.assert_close(out, alone[2](x), rtol=0, atol=0)
    for member, reference in zip(group, alone, strict=True):
        torch.testing.assert_close(member(x), reference(x), rtol=0, atol=0)
    copied(x)
    assert copied.qweight_layout == int8_engine


def test_a_group_packs_each_layer_once_under_concurrent_first_forwards(int8_engine, monkeypatch):
    """Threads whose first forwards hit different members at once: every layer is packed
    exactly once and every output is the one a layer packed alone gives."""
    if int8_engine is None:
        pytest.skip("nothing to pack without an int8 engine")
    packs: list[int] = []
    pack = QuantizedLinear._pack_int8

    def counting(self):
        packs.append(id(self))
        pack(self)

    monkeypatch.setattr(QuantizedLinear, "_pack_int8", counting)
    reference = _dynamic_int8_layers(6)
    with packed_together():
        group = _dynamic_int8_layers(6)
    x = torch.randn(2, IN)
    expected = [layer(x) for layer in reference]
    packs.clear()
    start = threading.Barrier(len(group))

    def first_forward(layer: QuantizedLinear) -> torch.Tensor:
        start.wait()
        return layer(x)

    with ThreadPoolExecutor(len(group)) as pool:
        outputs = list(pool.map(first_forward, group))
    assert sorted(packs) == sorted(id(layer) for layer in group)
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
