"""Per-layer precisions (``layer_overrides``) and the accuracy target (``max_accuracy_loss``):
the options' parsing, the plan's decisions, the search on small models (real quantization and
evaluation, not mocks), its refusals, and that ``info.layer_overrides`` reproduces a tuned
model without a search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mono_quant import load_quantized, quantize
from mono_quant.core.evaluation import Evaluator
from mono_quant.core.options import QuantizeOptions, parse_precision
from mono_quant.core.plan import plan_module, precision_of
from mono_quant.core.progress import Progress
from mono_quant.core.quantizers import build_run, prepare_run
from mono_quant.core.tuning import MAX_FLOAT_FRACTION, ladder, split_eval
from mono_quant.errors import ConfigurationError, InputError
from tests.core.test_plan import TiedLM


class OutlierMLP(nn.Module):
    """Three Linears; the middle one has a few huge input columns, so int4 hurts it most."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 256)
        self.mid = nn.Linear(256, 256)
        self.down = nn.Linear(256, 64)
        with torch.no_grad():
            self.mid.weight[:, :4] *= 30

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=generator) for _ in range(n)]


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given",
    [
        {"*.mid": "int8", "down": "FLOAT"},
        ["*.mid=int8", "down=float"],
        [("*.mid", "int8"), ("down", "float")],
    ],
    ids=["dict", "strings", "pairs"],
)
def test_layer_overrides_forms_give_one_typed_value(given):
    options = QuantizeOptions(bits=4, layer_overrides=given)
    assert options.layer_overrides == (("*.mid", "int8"), ("down", "float"))
    assert QuantizeOptions.from_kwargs(**options.given()).layer_overrides == options.layer_overrides


@pytest.mark.parametrize(
    "given, match",
    [
        ({"x": "int3"}, "unknown precision 'int3'"),
        ({"x": "int4-g48"}, "unknown precision 'int4-g48'"),
        (["no-equals-sign"], "is not 'pattern=precision'"),
        ({"re:(": "int8"}, "invalid regular expression"),
        ([42], "is not a \\(pattern, precision\\) pair"),
    ],
    ids=["bits", "group", "no-sign", "regex", "type"],
)
def test_bad_layer_overrides_are_refused_with_the_valid_values(given, match):
    with pytest.raises(ConfigurationError, match=match) as excinfo:
        QuantizeOptions(bits=4, layer_overrides=given)
    assert excinfo.value.suggestion


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 16, "layer_overrides": {"a": "int8"}}, "layer_overrides"),
        ({"bits": 4, "max_trials": 3}, "max_trials=3 is not used"),
        ({"bits": 4, "max_accuracy_loss": 0}, "must be a number in \\(0, 1\\)"),
        ({"bits": 4, "max_accuracy_loss": 1.5}, "must be a number in \\(0, 1\\)"),
        ({"bits": 4, "max_accuracy_loss": 0.01, "max_tuning_seconds": -1}, "must be a number > 0"),
    ],
)
def test_target_options_are_checked(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        QuantizeOptions.from_kwargs(**kwargs)


def test_ladders():
    assert ladder("int4-g128", "none") == ["int4-g32", "int8", "float"]
    assert ladder("int4-g32", "none") == ["int8", "float"]
    assert ladder("int8", "dynamic") == ["int8-weight-only", "float"]
    assert ladder("int8", "none") == ["float"]
    assert ladder("int8-weight-only", "static") == ["float"]
    assert parse_precision("bf16").cast == torch.bfloat16


# -- decisions --------------------------------------------------------------------------------------
def test_overrides_in_an_int4_run():
    model = TiedLM()  # hidden 192, tied lm_head, a Linear "proj" 192 -> 192
    overrides = {"proj": "int8", "embed_tokens": "int4-g32", "lm_head": "float"}
    plan = plan_module(model, QuantizeOptions(bits=4, layer_overrides=overrides))
    proj = plan.layers["proj"].config
    assert (proj.bits, proj.symmetric, proj.activation) == (8, True, "none")
    assert plan.layers["embed_tokens"].config.group_size == 32
    assert plan.layers["lm_head"].config is None
    assert "layer_overrides 'lm_head'" in plan.layers["lm_head"].reason
    # the reached precision names reproduce the decisions
    assert {n: precision_of(d, plan.options) for n, d in plan.layers.items()} == {
        "embed_tokens": "int4-g32",
        "proj": "int8",
        "lm_head": "float",
    }


def test_overrides_in_an_int8_dynamic_run():
    model = OutlierMLP()
    options = QuantizeOptions(
        bits=8, dynamic=True, layer_overrides={"mid": "int8-weight-only", "down": "int4-g32", "up": "fp16"}
    )
    plan = plan_module(model, options)
    assert plan.layers["mid"].config.activation == "none" and plan.layers["mid"].config.bits == 8
    down = plan.layers["down"].config
    assert (down.bits, down.group_size, down.symmetric, down.activation) == (4, 32, False, "none")
    assert plan.layers["up"].cast == torch.float16
    assert precision_of(plan.layers["mid"], options) == "int8-weight-only"


def test_first_matching_override_wins_and_kind_rules_still_apply():
    model = nn.Sequential(nn.Linear(63, 8), nn.Linear(8, 8))
    plan = plan_module(model, QuantizeOptions(bits=8, layer_overrides=[("0", "int4-g16"), ("*", "float")]))
    assert plan.layers["0"].config.bits == 8  # odd width: int4 packs two per byte
    assert "odd" in plan.layers["0"].note
    assert plan.layers["1"].config is None


def test_overrides_work_on_state_dicts_and_files(tmp_path):
    model = OutlierMLP()
    overrides = {"mid": "int8", "down": "float"}
    result = quantize(model.state_dict(), bits=4, layer_overrides=overrides)
    assert result.info.layer_configs["mid"]["bits"] == 8
    assert "down" not in result.info.layer_configs and "down" in result.info.skipped_layers
    path = result.save(tmp_path / "sd.safetensors")
    loaded = load_quantized(path, OutlierMLP())
    module_result = quantize(model, bits=4, layer_overrides=overrides)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), module_result.model(x))


def test_mixed_precisions_save_and_load(tmp_path):
    model = OutlierMLP()
    result = quantize(model, bits=4, layer_overrides={"mid": "int8", "down": "int4-g32"})
    assert result.info.layer_overrides == {"mid": "int8", "down": "int4-g32"}
    path = result.save(tmp_path / "mixed.safetensors")
    loaded = load_quantized(path, OutlierMLP())
    x = torch.randn(8, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), result.model(x))


# -- the search -----------------------------------------------------------------------------------
def test_target_is_met_and_the_overrides_reproduce_the_model():
    model = OutlierMLP().eval()
    result = quantize(model, bits=4, calibration_data=_batches(4, 1), eval_data=_batches(2, 2), max_accuracy_loss=0.002)
    assert result.success
    target = result.info.metrics["accuracy_target"]
    assert target["met"] and target["loss"] <= 0.002
    assert target["metric"] == "output_cosine"
    first = target["trials"][0]
    assert first["moved"] == 0 and not first["met"]  # plain int4 misses: the search had work to do
    assert target["moved_layers"] == len(result.info.layer_overrides) > 0
    # what moved is still quantized (the cap keeps most weights quantized) and smaller than fp32
    assert result.info.compression_ratio > 1.5
    assert "mid" in result.info.layer_overrides  # the outlier layer is the most sensitive
    # the recorded overrides give the same model without a search
    again = quantize(model, bits=4, layer_overrides=result.info.layer_overrides)
    x = torch.randn(16, 64)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x), result.model(x))
    evaluator = Evaluator(model, _batches(2, 2))
    assert evaluator.loss(again.model) == pytest.approx(target["loss"], abs=1e-6)


def test_a_target_already_met_moves_nothing():
    model = OutlierMLP().eval()
    result = quantize(model, bits=8, weight_only=True, eval_data=_batches(2, 2), max_accuracy_loss=0.05)
    target = result.info.metrics["accuracy_target"]
    assert target["met"] and len(target["trials"]) == 1 and result.info.layer_overrides == {}


def test_unmet_target_warns_and_returns_the_best_quantized_configuration():
    model = OutlierMLP().eval()
    result = quantize(model, bits=4, calibration_data=_batches(4, 1), max_accuracy_loss=1e-7, max_trials=4)
    assert result.success  # usable: the best configuration found
    target = result.info.metrics["accuracy_target"]
    assert not target["met"] and len(target["trials"]) <= 4
    assert any("not met" in w for w in result.warnings)
    assert target["loss"] == min(t["loss"] for t in target["trials"])
    # never more than half of the weights float
    float_weights = sum(
        model.get_submodule(n).weight.numel() for n, p in result.info.layer_overrides.items() if p == "float"
    )
    assert float_weights <= MAX_FLOAT_FRACTION * sum(m.weight.numel() for m in (model.up, model.mid, model.down))
    assert any("held out" in w for w in result.warnings)  # eval came from the calibration data


def test_smoothed_layers_moved_to_weight_only_still_divide_their_input():
    """int8 dynamic with calibration smooths the Linears (a layer without a norm before it keeps
    its scale as an input multiplier, its weight scaled); a trial that moves such a layer to
    weight-only must keep dividing its input, or its output would be scaled wrongly."""
    model = OutlierMLP().eval()
    options = QuantizeOptions(bits=8, dynamic=True)
    prepared = prepare_run(model, plan_module(model, options), _batches(4, 1), Progress())
    assert "mid" in prepared.input_smoothing
    moved = QuantizeOptions(bits=8, dynamic=True, layer_overrides={"mid": "int8-weight-only"})
    quantized, _ = build_run(prepared, plan_module(model, moved), Progress())
    assert quantized.mid.config.smoothed_input and quantized.mid.config.activation == "none"
    x = torch.randn(16, 64)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(model(x), quantized(x), dim=-1).mean()
    assert cosine > 0.999


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bits": 4, "max_accuracy_loss": 0.01}, ConfigurationError, "needs data to measure"),
        ({"bits": 4, "eval_data": [torch.randn(4, 64)]}, ConfigurationError, "eval_data was given without"),
        (
            {"bits": 4, "max_accuracy_loss": 0.01, "calibration_data": torch.randn(1, 64)},
            ConfigurationError,
            "nothing to hold out",
        ),
    ],
    ids=["no-data", "eval-without-target", "one-sample"],
)
def test_target_refusals(kwargs, error, match):
    with pytest.raises(error, match=match) as excinfo:
        quantize(OutlierMLP(), **kwargs)
    assert excinfo.value.suggestion


def test_state_dicts_cannot_take_a_target():
    with pytest.raises(InputError, match="no forward"):
        quantize(OutlierMLP().state_dict(), bits=4, max_accuracy_loss=0.01, eval_data=_batches(1, 0))


def test_split_eval():
    calibration, held = split_eval([1, 2, 3, 4, 5, 6, 7, 8])
    assert calibration == [1, 2, 3, 4, 5, 6] and held == [7, 8]
    calibration, held = split_eval([{"input_ids": torch.arange(8).reshape(4, 2)}])
    assert calibration[0]["input_ids"].shape[0] == 3 and held[0]["input_ids"].shape[0] == 1


def test_perplexity_is_the_metric_of_causal_lms():
    pytest.importorskip("transformers")
    from mono_quant.testing import tiny_llama

    model = tiny_llama(vocab_size=128)
    ids = torch.randint(0, 128, (4, 32))
    evaluator = Evaluator(model, [ids[:2], {"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:])}])
    assert evaluator.metric == "perplexity" and evaluator.baseline > 1
    assert evaluator.loss(model) == pytest.approx(0.0, abs=1e-6)
    result = quantize(model, bits=4, group_size=32, eval_data=[ids], max_accuracy_loss=0.001, max_trials=6)
    target = result.info.metrics["accuracy_target"]
    assert target["metric"] == "perplexity" and target["trials"][0]["perplexity"] > 0
    assert result.success


class SiblingBlock(nn.Module):
    """q / k / v read one input (serving stacks fuse them); the search must move them together."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, 64) for _ in range(3))
        self.o_proj = nn.Linear(64, 64)
        with torch.no_grad():
            self.v_proj.weight[:, :2] *= 40  # only v is hard: alone it would move first

    def forward(self, x):
        return self.o_proj(torch.relu(self.q_proj(x) * self.k_proj(x)) + self.v_proj(x))


def test_siblings_reading_one_input_move_together():
    model = SiblingBlock().eval()
    batches = [torch.randn(16, 64) for _ in range(4)]
    result = quantize(model, bits=4, group_size=64, calibration_data=batches, max_accuracy_loss=0.003)
    overrides = result.info.layer_overrides
    assert "v_proj" in overrides  # the outlier layer moved
    assert overrides.get("q_proj") == overrides.get("k_proj") == overrides["v_proj"]


def test_smoothing_under_the_callers_inference_mode():
    """quantize() called inside torch.inference_mode() with calibration data: the smoothed
    working copy is scaled in place, which inference tensors refuse unless copied outside it."""
    model = OutlierMLP().eval()
    with torch.inference_mode():
        result = quantize(model, bits=8, dynamic=True, calibration_data=_batches(2, 1))
    assert result.success and result.info.metrics["smoothing"]["layers"] > 0
