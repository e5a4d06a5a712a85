"""QuantizedConv1d / QuantizedConv2d: int8 storage, forward vs a dequantized reference, round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedConv1d, QuantizedConv2d

CONVS = {
    "conv2d": lambda: nn.Conv2d(6, 12, 3, padding=1),
    "conv2d-strided-dilated": lambda: nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2),
    "conv2d-grouped-no-bias": lambda: nn.Conv2d(6, 12, 3, groups=3, bias=False),
    "conv2d-depthwise": lambda: nn.Conv2d(6, 6, 5, groups=6, padding=2),
    "conv1d": lambda: nn.Conv1d(6, 12, 5, padding=2),
    "conv1d-strided": lambda: nn.Conv1d(6, 12, 3, stride=2),
}
CONFIGS = {
    "sym": LayerQuantConfig(bits=8, symmetric=True),
    "asym": LayerQuantConfig(bits=8, symmetric=False),
    "per-tensor": LayerQuantConfig(bits=8, per_channel=False),
}


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CONVS[name]()


def _input(conv: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 6, 10, 10) if isinstance(conv, nn.Conv2d) else torch.randn(2, 6, 20)


def _functional(conv: nn.Module):
    return F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d


def _quantized_class(conv: nn.Module):
    return QuantizedConv2d if isinstance(conv, nn.Conv2d) else QuantizedConv1d


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_forward_matches_dequantized_reference(conv_name, config_name):
    conv = _make(conv_name)
    layer = _quantized_class(conv).from_float(conv, CONFIGS[config_name])
    x = _input(conv)
    out = layer(x)
    reference = _functional(conv)(
        x, layer.dequantized_weight(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert sqnr(conv(x), out) > 33  # int8 per-channel weights (measured ~40 dB)


@pytest.mark.parametrize("conv_name", list(CONVS))
def test_stores_int8_per_output_channel(conv_name):
    conv = _make(conv_name)
    layer = _quantized_class(conv).from_float(conv, LayerQuantConfig(bits=8, symmetric=False))
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == conv.weight.shape
    assert layer.weight_scale.shape == (conv.out_channels,)
    assert layer.weight_zero_point.dtype == torch.int8
    assert list(layer.parameters()) == []


@pytest.mark.parametrize("activation_symmetric", [False, True], ids=["asym-act", "sym-act"])
@pytest.mark.parametrize("conv_name", ["conv2d", "conv1d"])
def test_static_quantizes_the_input_with_the_given_qparams(ref, conv_name, activation_symmetric):
    conv = _make(conv_name)
    scale = torch.tensor(0.02)
    zero_point = torch.tensor(0 if activation_symmetric else -5, dtype=torch.int32)
    config = LayerQuantConfig(bits=8, activation="static", activation_symmetric=activation_symmetric)
    layer = _quantized_class(conv).from_float(conv, config, input_qparams=(scale, zero_point))
    x = _input(conv)
    x_hat = ref.static(x, scale, zero_point.float(), activation_symmetric)
    reference = _functional(conv)(x_hat, layer.dequantized_weight(), conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    coarse = _quantized_class(conv).from_float(conv, config, input_qparams=(scale * 10, zero_point))
    assert not torch.allclose(coarse(x), layer(x))


@pytest.mark.parametrize("conv_name", list(CONVS))
@pytest.mark.parametrize("activation", ["none", "static"])
def test_state_dict_round_trip_is_bitwise_identical(ref, conv_name, activation):
    conv = _make(conv_name)
    extra = (
        {"input_qparams": (torch.tensor(0.05), torch.tensor(3, dtype=torch.int32))} if activation == "static" else {}
    )
    layer = _quantized_class(conv).from_float(
        conv, LayerQuantConfig(bits=8, symmetric=False, activation=activation), **extra
    )
    torch.manual_seed(42)
    restored = ref.rebuild(layer, CONVS[conv_name]())
    x = _input(conv)
    assert type(restored) is type(layer)
    assert torch.equal(restored(x), layer(x))


def test_int4_and_groups_are_refused_with_a_suggestion():
    for config in (LayerQuantConfig(bits=4, group_size=32), LayerQuantConfig(bits=8, group_size=32)):
        with pytest.raises(ConfigurationError, match="int8 per-channel weights only") as info:
            QuantizedConv2d.from_float(nn.Conv2d(3, 4, 3), config)
        assert "layer_types" in info.value.suggestion


def test_non_zero_padding_mode_is_refused():
    with pytest.raises(ConfigurationError, match="padding_mode='reflect'") as info:
        QuantizedConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), LayerQuantConfig())
    assert "exclude" in info.value.suggestion
