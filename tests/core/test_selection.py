"""mono_quant.core.selection: which layers are quantized, and why the others are not."""

from __future__ import annotations

import pytest
from torch import nn

from mono_quant.api.exceptions import ConfigurationError
from mono_quant.core.selection import LayerSelection, select_layers


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.key = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(16, 16, 3)
        self.rnn = nn.LSTM(16, 16)
        self.tiny = nn.Linear(2, 2)
        self.classifier = nn.Linear(16, 4)


def _names(pairs):
    return [name for name, _ in pairs]


def test_default_selects_every_supported_type_and_nothing_else():
    selected, skipped = select_layers(Net(), LayerSelection())
    assert set(_names(selected)) == {
        "embed",
        "conv",
        "rnn",
        "tiny",
        "classifier",
        *(f"layers.{i}.{p}" for i in (0, 1) for p in ("query", "key", "value")),
    }
    assert skipped == []  # LayerNorm is not a candidate at all


def test_layer_types():
    selected, skipped = select_layers(Net(), LayerSelection(layer_types=["Embedding", "lstm"]))
    assert _names(selected) == ["embed", "rnn"]
    assert skipped == []


def test_include_glob_and_skip_reason():
    selected, skipped = select_layers(Net(), LayerSelection(layer_types=["linear"], include="layers.*.query"))
    assert _names(selected) == ["layers.0.query", "layers.1.query"]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["classifier"] == "not matched by any include pattern"
    assert len(skipped) == 6


def test_exclude_glob_with_character_class():
    selected, skipped = select_layers(Net(), LayerSelection(layer_types="linear", exclude=["layers.[1].*", "tiny"]))
    assert _names(selected) == ["layers.0.query", "layers.0.key", "layers.0.value", "classifier"]
    assert {s.name for s in skipped} == {"layers.1.query", "layers.1.key", "layers.1.value", "tiny"}
    assert all(s.reason == "matched an exclude pattern" and s.layer_type == "linear" for s in skipped)


def test_regex_patterns_match_the_whole_name():
    selection = LayerSelection(layer_types=["linear"], include=[r"re:layers\.\d+\.(query|key)"])
    selected, _ = select_layers(Net(), selection)
    assert _names(selected) == ["layers.0.query", "layers.0.key", "layers.1.query", "layers.1.key"]
    # fullmatch: a regex matching only a prefix selects nothing
    selected, _ = select_layers(Net(), LayerSelection(include=["re:layers"]))
    assert selected == []


def test_glob_does_not_match_a_prefix():
    selected, skipped = select_layers(Net(), LayerSelection(exclude=["layers"]))
    assert skipped == [] and len(selected) == 11


def test_min_params_skips_small_layers_with_the_count():
    selected, skipped = select_layers(Net(), LayerSelection(layer_types=["linear"], min_params=50))
    assert "tiny" not in _names(selected) and "classifier" in _names(selected)
    assert [(s.name, s.reason) for s in skipped] == [("tiny", "6 parameters < min_params=50")]


@pytest.mark.parametrize(
    "kwargs, match, in_suggestion",
    [
        ({"layer_types": ["linear", "attention"]}, "unknown layer type", "conv2d"),
        ({"min_params": -1}, "min_params must be a non-negative integer", "min_params=0"),
        ({"include": 5}, "include must be a string or a list of strings", "re:"),
        ({"exclude": ["ok", 3]}, "exclude entries must be strings", "glob"),
        ({"include": ["re:(unclosed"]}, "invalid regular expression", "glob"),
    ],
    ids=["layer_type", "min_params", "include-type", "exclude-entry", "bad-regex"],
)
def test_bad_selection_raises_configuration_error(kwargs, match, in_suggestion):
    with pytest.raises(ConfigurationError, match=match) as info:
        LayerSelection(**kwargs)
    assert in_suggestion in info.value.suggestion
    assert info.value.suggestion in str(info.value)
