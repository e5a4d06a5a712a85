"""mono_quant.core.plan: which layers are quantized and how, why the others are not; the same
decisions for a module and for its state_dict; ties; the embedding / lm_head policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mono_quant.core.options import QuantizeOptions
from mono_quant.core.plan import LayerQuantConfig, plan_module, plan_tensors, weight_layout
from mono_quant.errors import ConfigurationError
from mono_quant.io.formats import plan_state_dict


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


class TiedLM(nn.Module):
    """A small LM with tied input / output embeddings and an odd hidden size (like SmolLM2's 576)."""

    def __init__(self, vocab: int = 64, hidden: int = 192) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.proj(self.embed_tokens(ids))))


def _plan(model, **kwargs):
    return plan_module(model, QuantizeOptions.from_kwargs(**kwargs))


def test_default_selects_every_supported_type_and_nothing_else():
    plan = _plan(Net(), bits=8, dynamic=True)
    assert set(plan.selected) == {
        "embed",
        "conv",
        "rnn",
        "tiny",
        "classifier",
        *(f"layers.{i}.{p}" for i in (0, 1) for p in ("query", "key", "value")),
    }
    assert plan.skipped == {}  # LayerNorm is not a candidate at all


def test_layer_types_are_not_candidates_otherwise():
    plan = _plan(Net(), bits=8, dynamic=True, layer_types=["Embedding", "lstm"])
    assert plan.selected == ["embed", "rnn"]
    assert plan.skipped == {}


def test_include_glob_and_skip_reason():
    plan = _plan(Net(), bits=8, dynamic=True, layer_types=["linear"], include="layers.*.query")
    assert plan.selected == ["layers.0.query", "layers.1.query"]
    assert plan.skipped["classifier"] == "not matched by any include pattern"
    assert len(plan.skipped) == 6


def test_exclude_glob_with_character_class():
    plan = _plan(Net(), bits=8, dynamic=True, layer_types="linear", exclude=["layers.[1].*", "tiny"])
    assert plan.selected == ["layers.0.query", "layers.0.key", "layers.0.value", "classifier"]
    assert set(plan.skipped) == {"layers.1.query", "layers.1.key", "layers.1.value", "tiny"}
    assert set(plan.skipped.values()) == {"matched an exclude pattern"}


def test_regex_patterns_match_the_whole_name():
    plan = _plan(Net(), bits=8, dynamic=True, layer_types=["linear"], include=[r"re:layers\.\d+\.(query|key)"])
    assert plan.selected == ["layers.0.query", "layers.0.key", "layers.1.query", "layers.1.key"]
    assert _plan(Net(), bits=8, dynamic=True, include=["re:layers"]).selected == []  # fullmatch


def test_min_params_counts_the_weight():
    plan = _plan(Net(), bits=8, dynamic=True, layer_types=["linear"], min_params=50)
    assert "tiny" not in plan.selected and "classifier" in plan.selected
    assert plan.skipped == {"tiny": "4 parameters < min_params=50"}


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
        QuantizeOptions.from_kwargs(**kwargs)
    assert in_suggestion in info.value.suggestion
    assert info.value.suggestion in str(info.value)


# -- policies ------------------------------------------------------------------------------------------
def test_int4_policy_embedding_and_tied_lm_head_at_8_bits_partial_groups_elsewhere():
    plan = _plan(TiedLM(), bits=4)
    embed, proj, head = (plan.layers[n] for n in ("embed_tokens", "proj", "lm_head"))
    assert embed.config.bits == 8 and embed.config.group_size is None and embed.config.symmetric  # Q8_0-like
    assert head.config.bits == 8 and head.config.activation == "none" and "output head" in head.note
    assert proj.config.bits == 4 and proj.config.group_size == 128 and proj.config.groups(192) == 2
    assert plan.ties == {"embed_tokens": ["embed_tokens", "lm_head"]}
    assert plan.shared_with("lm_head") == "embed_tokens"  # same int8 grid: quantized once


def test_lm_head_bits_options():
    plan = _plan(TiedLM(), bits=4, lm_head_bits=16)
    assert plan.layers["lm_head"].config is None and "lm_head_bits=16" in plan.skipped["lm_head"]
    plan = _plan(TiedLM(), bits=4, lm_head_bits=4)
    assert plan.layers["lm_head"].config.bits == 4
    assert plan.shared_with("lm_head") is None  # int4 head, int8 table: each its own tensors


def test_odd_widths_cannot_pack_int4_and_get_int8():
    plan = _plan(nn.Sequential(nn.Linear(33, 8)), bits=4)
    decision = plan.layers["0"]
    assert decision.config.bits == 8 and "odd" in decision.note


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4},
        {"bits": 4, "group_size": 32, "scheme": "symmetric"},
        {"bits": 8, "dynamic": True},
        {"bits": 8, "weight_only": True, "exclude": ["lm_head"]},
        {"bits": 8, "dynamic": True, "min_params": 20000, "layer_types": ["linear"]},
        {"bits": 16},
    ],
    ids=["int4", "int4-g32-sym", "int8-dynamic", "int8-wo-exclude", "min-params", "fp16"],
)
def test_a_module_and_its_state_dict_get_the_same_decisions(kwargs):
    model = TiedLM()
    options = QuantizeOptions.from_kwargs(**kwargs)
    as_module = plan_module(model, options)
    as_tensors = plan_state_dict(model.state_dict(), options)
    assert as_tensors.layers == as_module.layers
    assert as_tensors.ties == as_module.ties


def test_tensor_plans_infer_kinds_from_names_and_shapes():
    entries = [("enc.embed.weight", (10, 64), torch.float32), ("enc.conv.weight", (8, 4, 3), torch.float32)]
    entries += [("enc.fc.weight", (8, 64), torch.float32), ("enc.fc.bias", (8,), torch.float32)]
    plan = plan_tensors(entries, QuantizeOptions(bits=4))
    assert {n: d.kind for n, d in plan.layers.items()} == {
        "enc.embed": "embedding",
        "enc.conv": "conv1d",
        "enc.fc": "linear",
    }
    assert plan.layers["enc.conv"].config.bits == 8  # no int4 convolutions


def test_weight_layout_is_the_one_declaration():
    config = LayerQuantConfig(bits=4, symmetric=False, group_size=128)
    assert [(t.name, t.dtype, t.shape) for t in weight_layout(config, (16, 576))] == [
        ("qweight", torch.uint8, (16, 288)),
        ("weight_scale", torch.float32, (16, 5)),
        ("weight_zero_point", torch.uint8, (16, 5)),
    ]
    assert [t.name for t in weight_layout(LayerQuantConfig(bits=8), (16, 64))] == ["qweight", "weight_scale"]
