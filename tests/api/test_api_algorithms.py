"""quantize(method=..., smoothing=...): GPTQ, HQQ and SmoothQuant through the one entry point,
on modules, state_dicts and files, saved and reloaded bit-exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mono_quant import load_quantized, quantize, quantize_file
from mono_quant.core.schemes import sqnr
from mono_quant.errors import ConfigurationError, InputError
from mono_quant.io.formats import load_model


def _correlated_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP whose inputs are strongly correlated (as real activations are), with one
    outlier channel: where GPTQ and SmoothQuant have something to fix."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    mixing = torch.randn(256, 256) / 16

    def sample(n):
        x = torch.randn(n, 256) @ mixing + torch.randn(n, 256) * 0.05
        x[:, 7] *= 40.0  # an activation outlier channel
        return x

    return model, sample(512), sample(256)


def _error_db(model, quantized, x) -> float:
    with torch.inference_mode():
        return sqnr(model(x), quantized(x))


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    model, calibration, held_out = _correlated_mlp()
    rtn = quantize(model, bits=4, group_size=32)
    gptq = quantize(model, bits=4, group_size=32, method="gptq", calibration_data=calibration)
    assert gptq, gptq.errors
    assert gptq.model[0].config.method == "gptq"
    assert _error_db(model, gptq.model, held_out) > _error_db(model, rtn.model, held_out) + 1.0


def test_static_int8_smooths_each_group_by_its_static_error_and_leaves_it_where_that_is_best():
    """Static int8 with calibration data (always there) smooths by default: each group's alpha, or
    none, by static int8's output error on its calibration samples (one activation scale per tensor)."""
    model, calibration, held_out = _correlated_mlp(2)
    unsmoothed = quantize(model, bits=8, calibration_data=calibration, smoothing=0)
    smoothed = quantize(model, bits=8, calibration_data=calibration)
    assert smoothed, smoothed.errors
    assert smoothed.info.metrics["smoothing"]["per_group"]
    assert smoothed.model[0].config.smoothed_input  # the outlier channel's group took an alpha
    # measured +2.6 dB (a fixed 0.5: +2.6, 0.8: +1.9)
    assert _error_db(model, smoothed.model, held_out) > _error_db(model, unsmoothed.model, held_out) + 2.0
    # inputs without outlier channels: any alpha costs static int8 accuracy, so none is taken
    torch.manual_seed(3)
    plain_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    data, test = torch.randn(512, 64), torch.randn(256, 64)
    default = quantize(plain_model, bits=8, calibration_data=data)
    forced = quantize(plain_model, bits=8, calibration_data=data, smoothing=0.8)
    off = quantize(plain_model, bits=8, calibration_data=data, smoothing=0)
    assert not default.model[0].config.smoothed_input
    assert _error_db(plain_model, default.model, test) >= _error_db(plain_model, off.model, test) - 0.2
    assert _error_db(plain_model, default.model, test) > _error_db(plain_model, forced.model, test) + 1.0


def test_smoothing_folded_only_leaves_no_layer_dividing_its_input():
    """A tiny Llama: q/k/v and gate/up fold into their norms, down_proj into up_proj; o_proj
    (grouped-query attention) has nowhere to fold. Folded only, it is left unsmoothed and the
    result stores in compressed-tensors."""
    pytest.importorskip("transformers")
    from mono_quant.export import get_format
    from mono_quant.testing import tiny_llama

    model = tiny_llama(num_key_value_heads=2)
    tokens = [
        {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    full = quantize(model, bits=8, dynamic=True, calibration_data=tokens)
    folded = quantize(model, bits=8, dynamic=True, calibration_data=tokens, smoothing_folded_only=True)
    smoothed = [
        n for n, m in full.model.named_modules() if getattr(getattr(m, "config", None), "smoothed_input", False)
    ]
    assert smoothed and all(n.endswith("o_proj") for n in smoothed)
    assert not any(getattr(getattr(m, "config", None), "smoothed_input", False) for m in folded.model.modules())
    metrics = folded.info.metrics["smoothing"]
    assert metrics["folded_only"] and metrics["input_scales"] == 0
    assert metrics["layers"] == full.info.metrics["smoothing"]["layers"] - len(smoothed) > 0
    # the norms carry the folded scales: the float model computes the same, so the outputs stay close
    with torch.inference_mode():
        reference, ours = model(**tokens[0]).logits, folded.model(**tokens[0]).logits
    assert sqnr(reference, ours) > 25
    get_format("compressed-tensors").check(folded.info)  # no input scale to refuse
    with pytest.raises(ConfigurationError, match="smoothing_folded_only=True"):
        get_format("compressed-tensors").check(full.info)
    with pytest.raises(ConfigurationError, match="smoothing_folded_only"):
        quantize(model, bits=8, dynamic=True, smoothing=0, smoothing_folded_only=True)


def test_smoothing_helps_dynamic_int8_with_an_outlier_channel(tmp_path):
    model, calibration, held_out = _correlated_mlp(1)
    plain = quantize(model, bits=8, dynamic=True)
    smoothed = quantize(model, bits=8, dynamic=True, calibration_data=calibration)
    assert smoothed.info.metrics["smoothing"]["per_group"]  # real data: each group's best alpha
    assert "smoothing" not in plain.info.metrics  # no data, no token embedding: nothing to measure
    assert smoothed.model[0].config.smoothed_input  # no norm before it: an input scale
    assert _error_db(model, smoothed.model, held_out) > _error_db(model, plain.model, held_out) + 1.0
    assert smoothed.model[0].config.method == "rtn"  # int8 keeps round-to-nearest unless asked
    with pytest.raises(ConfigurationError, match="does not use it"):  # smoothing=0: the data has no use
        quantize(model, bits=8, dynamic=True, calibration_data=calibration, smoothing=0)
    restored = load_quantized(smoothed.save(tmp_path / "s.safetensors"), _correlated_mlp(1)[0])
    with torch.inference_mode():
        assert torch.equal(restored(held_out), smoothed.model(held_out))
    assert torch.equal(model[0].weight, _correlated_mlp(1)[0][0].weight)  # the caller's model untouched


def test_hqq_is_data_free_and_works_on_modules_state_dicts_and_files(tmp_path):
    model, _, held_out = _correlated_mlp(2)
    result = quantize(model, bits=4, group_size=64, method="hqq")
    layer = result.model[0]
    assert layer.weight_zero_point.dtype is torch.float32  # HQQ's float zero points, stored as such
    assert _error_db(model, result.model, held_out) > 15
    module_file = result.save(tmp_path / "module.safetensors")
    from_state_dict = quantize(model.state_dict(), bits=4, group_size=64, method="hqq")
    source = tmp_path / "source.safetensors"
    save_file(model.state_dict(), source)
    streamed = quantize_file(source, tmp_path / "file.safetensors", bits=4, group_size=64, method="hqq")
    expected = load_model(module_file)
    for tensors in (from_state_dict.model, load_model(streamed)):
        for key, value in expected.items():
            assert torch.equal(tensors[key], value), key
    restored = load_quantized(module_file, _correlated_mlp(2)[0])
    with torch.inference_mode():
        assert torch.equal(restored(held_out), result.model(held_out))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bits": 4, "method": "gptq"}, ConfigurationError, "method='gptq' needs calibration data"),
        ({"bits": 4, "method": "rtn", "calibration_data": torch.randn(4, 256)}, ConfigurationError, "does not use"),
        ({"bits": 8, "weight_only": True, "calibration_data": torch.randn(4, 256)}, ConfigurationError, "does not"),
        ({"bits": 8, "weight_only": True, "smoothing": 0.5}, ConfigurationError, "smoothing=0.5 is not used"),
        ({"bits": 8, "dynamic": True, "smoothing": 1.5}, ConfigurationError, "smoothing must be a number in"),
        ({"bits": 4, "method": "awq"}, ConfigurationError, "method='awq' is not supported"),
        ({"bits": 8, "dynamic": True, "smoothing": 0.5}, ConfigurationError, "no token embedding"),
    ],
    ids=[
        "gptq-without-data",
        "int4-rtn-with-data",
        "weight-only-with-data",
        "smoothing-weight-only",
        "alpha-1.5",
        "awq",
        "smoothing-without-anything-to-measure",
    ],
)
def test_options_the_mode_cannot_use_are_refused(kwargs, error, match):
    model, _, _ = _correlated_mlp()
    with pytest.raises(error, match=match) as info:
        quantize(model, **kwargs)
    assert info.value.suggestion


def test_gptq_needs_a_model_it_can_run():
    model, calibration, _ = _correlated_mlp()
    with pytest.raises(InputError, match="has no forward"):
        quantize(model.state_dict(), bits=4, method="gptq", calibration_data=calibration)


def test_int4_default_rounding_follows_the_data():
    """int4's default rounding: GPTQ with calibration data; HQQ weighted by each input feature's
    mean square on random tokens for a model with a token embedding (below); round-to-nearest
    when there is nothing to measure on (HQQ unweighted is no better). method='hqq' with
    calibration data weighs by the data's statistics."""
    model, calibration, held_out = _correlated_mlp(3)
    plain = quantize(model, bits=4, group_size=32)
    assert plain.model[0].config.method == "rtn" and "statistics" not in plain.info.metrics
    default = quantize(model, bits=4, group_size=32, calibration_data=calibration)
    assert default.model[0].config.method == "gptq"
    weighted = quantize(model, bits=4, group_size=32, method="hqq", calibration_data=calibration)
    assert weighted, weighted.errors
    assert weighted.model[0].config.method == "hqq" and weighted.model[0].config.float_zero_point
    assert weighted.info.metrics["statistics"]["source"] == "calibration data"
    # the outlier input channel's columns are rounded with care: far less output error
    assert _error_db(model, weighted.model, held_out) > _error_db(model, plain.model, held_out) + 1.0


def test_token_models_get_data_free_statistics_from_random_tokens(tmp_path):
    from mono_quant.testing import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    int4 = quantize(model, bits=4, group_size=32)
    assert int4, int4.errors
    assert int4.info.metrics["statistics"] == {"source": "random tokens", "batches": 2}
    configs = int4.info.layer_configs
    assert {c["method"] for n, c in configs.items() if n.startswith("model.layers.")} == {"hqq"}
    assert configs["lm_head"]["method"] == "rtn"  # the 8-bit head keeps round-to-nearest
    int8 = quantize(model, bits=8, dynamic=True)
    smoothing = int8.info.metrics["smoothing"]
    assert smoothing["alpha"] == 0.5 and not smoothing["per_group"] and not smoothing["requested"]
    # grouped-query o_proj has no free fold: an input scale; down_proj folds into up_proj
    assert int8.model.model.layers[0].self_attn.o_proj.config.smoothed_input
    assert not int8.model.model.layers[0].mlp.down_proj.config.smoothed_input
    with torch.inference_mode():
        reference = model(ids).logits
        for result in (int4, int8):
            out = result.model(ids).logits
            assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.98
    off = quantize(model, bits=8, dynamic=True, smoothing=0)
    assert "smoothing" not in off.info.metrics
    rtn = quantize(model, bits=4, group_size=32, method="rtn")
    assert "statistics" not in rtn.info.metrics
