"""QuantizedLSTM / QuantizedGRU: int8 weights, float compute, every nn.LSTM/GRU feature kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedGRU, QuantizedLSTM

# torch falls back from oneDNN for projected LSTMs and says so; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

VARIANTS = {
    "lstm": lambda: nn.LSTM(12, 20),
    "lstm-batch-first-2-layers": lambda: nn.LSTM(12, 20, num_layers=2, batch_first=True),
    "lstm-bidirectional": lambda: nn.LSTM(12, 20, batch_first=True, bidirectional=True),
    "lstm-proj": lambda: nn.LSTM(12, 20, batch_first=True, proj_size=8),
    "gru": lambda: nn.GRU(12, 20),
    "gru-bidirectional-2-layers": lambda: nn.GRU(12, 20, num_layers=2, bidirectional=True, batch_first=True),
}
QUANTIZED = {nn.LSTM: QuantizedLSTM, nn.GRU: QuantizedGRU}


def _make(name: str) -> nn.RNNBase:
    torch.manual_seed(0)
    return VARIANTS[name]().eval()


def _input(rnn: nn.RNNBase) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 7, 12) if rnn.batch_first else torch.randn(7, 3, 12)


def _dequantized_float_copy(name: str, layer) -> nn.RNNBase:
    """A float RNN of the same kind with the quantized layer's dequantized weights."""
    reference = VARIANTS[name]().eval()
    reference.load_state_dict(layer.dequantized_parameters())
    return reference


def _quantize(name: str, symmetric: bool = True):
    rnn = _make(name)
    layer = QUANTIZED[type(rnn)].from_float(rnn, LayerQuantConfig(bits=8, symmetric=symmetric))
    return rnn, layer


def _outputs(result) -> list[torch.Tensor]:
    output, state = result
    states = list(state) if isinstance(state, tuple) else [state]
    return [output, *states]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_dequantized_reference(name, symmetric):
    rnn, layer = _quantize(name, symmetric)
    x = _input(rnn)
    got = _outputs(layer(x))
    reference = _outputs(_dequantized_float_copy(name, layer)(x))
    for out, expected in zip(got, reference, strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for out, expected in zip(got, _outputs(rnn(x)), strict=True):
        assert sqnr(expected, out) > 30  # int8 per-row weights (measured ~38-40 dB)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_weights_are_stored_int8_and_biases_float(name):
    rnn, layer = _quantize(name, symmetric=False)
    for param_name, param in rnn.named_parameters():
        if param_name.startswith("weight_"):
            q = getattr(layer, f"{param_name}_q")
            assert q.dtype == torch.int8 and q.shape == param.shape
            assert getattr(layer, f"{param_name}_scale").shape == (param.shape[0],)
            assert getattr(layer, f"{param_name}_zero_point").dtype == torch.int8
        else:
            assert torch.equal(getattr(layer, param_name), param.detach())
    assert list(layer.parameters()) == []


def test_initial_state_is_used():
    name = "lstm-batch-first-2-layers"
    rnn, layer = _quantize(name)
    x = _input(rnn)
    h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
    out, _ = layer(x, (h0, c0))
    expected, _ = _dequantized_float_copy(name, layer)(x, (h0, c0))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, layer(x)[0])


@pytest.mark.parametrize("name", ["lstm-bidirectional", "gru-bidirectional-2-layers"])
def test_packed_sequence(name):
    rnn, layer = _quantize(name)
    x = _input(rnn)
    lengths = torch.tensor([7, 4, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_packed, _ = layer(packed)
    assert isinstance(out_packed, nn.utils.rnn.PackedSequence)
    out, out_lengths = pad_packed_sequence(out_packed, batch_first=True)
    assert out_lengths.tolist() == [7, 4, 2]
    expected, _ = pad_packed_sequence(_dequantized_float_copy(name, layer)(packed)[0], batch_first=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2, 2:], torch.zeros_like(out[2, 2:]))  # padding stays padding


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("target", ["fresh", "meta"])
def test_state_dict_round_trip_is_bitwise_identical(ref, name, symmetric, target):
    rnn, layer = _quantize(name, symmetric)
    if target == "meta":
        with torch.device("meta"):
            shell = VARIANTS[name]()
    else:
        torch.manual_seed(7)
        shell = VARIANTS[name]()
    restored = ref.rebuild(layer, shell)
    x = _input(rnn)
    for out, expected in zip(_outputs(restored(x)), _outputs(layer(x)), strict=True):
        assert torch.equal(out, expected)


def test_int4_is_refused_with_a_suggestion():
    with pytest.raises(ConfigurationError, match="int8 per-channel weights only") as info:
        QuantizedLSTM.from_float(nn.LSTM(4, 4), LayerQuantConfig(bits=4, group_size=32))
    assert "layer_types" in info.value.suggestion
