"""QuantizedEmbedding: int8 rows, int4 groups, padding_idx, lookups vs the dequantized table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.schemes import sqnr
from mono_quant.modules import LayerQuantConfig, QuantizedEmbedding

CONFIGS = {
    "int8-sym": (LayerQuantConfig(bits=8, symmetric=True), 38.0),
    "int8-asym": (LayerQuantConfig(bits=8, symmetric=False), 38.0),
    "int4-asym-g16": (LayerQuantConfig(bits=4, symmetric=False, group_size=16), 17.0),
    "int4-sym-g32": (LayerQuantConfig(bits=4, symmetric=True, group_size=32), 14.0),
}


@pytest.fixture
def embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(100, 64, padding_idx=0)


@pytest.fixture
def indices() -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (4, 9))
    ids[:, -2:] = 0  # padding
    return ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lookup_matches_dequantized_table(embedding, indices, name):
    config, min_sqnr = CONFIGS[name]
    layer = QuantizedEmbedding.from_float(embedding, config)
    out = layer(indices)
    assert out.shape == (4, 9, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.embedding(indices, layer.dequantized_weight()), rtol=0, atol=1e-6)
    assert sqnr(embedding(indices), out) > min_sqnr


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_row_stays_exactly_zero(embedding, indices, name):
    layer = QuantizedEmbedding.from_float(embedding, CONFIGS[name][0])
    assert layer.padding_idx == 0
    assert torch.equal(layer(indices)[:, -2:], torch.zeros(4, 2, 64))


def test_int8_storage(embedding):
    layer = QuantizedEmbedding.from_float(embedding, LayerQuantConfig(bits=8, symmetric=False))
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (100, 64)
    assert layer.weight_scale.shape == (100,) and layer.weight_zero_point.dtype == torch.int8


def test_int4_storage_is_packed(embedding):
    layer = QuantizedEmbedding.from_float(embedding, LayerQuantConfig(bits=4, group_size=16))
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (100, 32)
    assert layer.weight_scale.shape == (100, 4) and layer.weight_zero_point.dtype == torch.uint8


def test_activation_modes_are_ignored_for_indices(embedding, indices):
    plain = QuantizedEmbedding.from_float(embedding, LayerQuantConfig(bits=8))
    dynamic = QuantizedEmbedding.from_float(embedding, LayerQuantConfig(bits=8, activation="dynamic"))
    assert dynamic.config.activation == "none"
    assert torch.equal(plain(indices), dynamic(indices))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("target", ["fresh", "meta"])
def test_state_dict_round_trip_is_bitwise_identical(ref, embedding, indices, name, target):
    layer = QuantizedEmbedding.from_float(embedding, CONFIGS[name][0])
    if target == "meta":
        with torch.device("meta"):
            shell = nn.Embedding(100, 64, padding_idx=0)
    else:
        shell = nn.Embedding(100, 64, padding_idx=0)
    restored = ref.rebuild(layer, shell)
    assert torch.equal(restored(indices), layer(indices))


def test_max_norm_is_refused():
    with pytest.raises(ConfigurationError, match="max_norm") as info:
        QuantizedEmbedding.from_float(nn.Embedding(10, 8, max_norm=1.0), LayerQuantConfig())
    assert "exclude" in info.value.suggestion
