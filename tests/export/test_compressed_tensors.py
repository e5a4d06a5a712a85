"""compressed-tensors export, proven by its real consumer: transformers + compressed-tensors
(``from_pretrained``), on MiniLM (embeddings) and SmolLM2-135M (perplexity).

Scales are written in fp32 and loaded into fp32 models, so the consumer's decompressed weights
are compared with ours by ``torch.equal``. Outputs: cosine >= 0.999 (every sentence) weight-only.
W8A8: the consumer re-quantizes activations on its own grid (per token, max / 127.5 where we use
max / 127), an independent rounding of the same size as ours: mean cosine >= 0.995, every
sentence >= 0.99, and the consumer is as close to the float model as we are (within 0.002).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant
from mono_quant.errors import ConfigurationError
from mono_quant.export import compressed_tensors as ct_export

ct = pytest.importorskip("compressed_tensors")
pytest.importorskip("transformers")

# compressed-tensors has no per-channel input scale and no float zero point: the defaults that
# need them (SmoothQuant from random tokens or static's calibration data, HQQ) are turned off here, as
# options_for_formats does for the CLI's --format and the service's export_formats.
MINILM_CASES = {
    "w8a8-dynamic": dict(bits=8, dynamic=True, smoothing=0),
    # symmetric tokens (the default gives each token its own zero point: symmetric: false)
    "w8a8-dynamic-sym-folded": dict(bits=8, dynamic=True, smoothing_folded_only=True, activation_scheme="symmetric"),
    "w8a8-static": dict(bits=8, dynamic=False, smoothing=0),  # calibration_data added by the fixture
    "w8a16": dict(bits=8, weight_only=True),
    "w4a16-sym": dict(bits=4, scheme="symmetric", group_size=128),
    "w4a16-asym": dict(bits=4, group_size=128, method="rtn"),
}
EXPECTED_FORMAT = {
    "w8a8-dynamic": "int-quantized",
    "w8a8-dynamic-sym-folded": "int-quantized",
    "w8a8-static": "int-quantized",
    "w8a16": "pack-quantized",
    "w4a16-sym": "pack-quantized",
    "w4a16-asym": "pack-quantized",
}


def load_consumer(folder: Path, auto_class, dequantize: bool):
    from transformers import CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return auto_class.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    from mono_quant.modules import QuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def assert_same_weights(ours: nn.Module, theirs: nn.Module) -> None:
    layers = quantized_linears(ours)
    assert layers
    for name, layer in layers.items():
        weight = theirs.get_submodule(name).weight
        assert weight.dtype == torch.float32, name
        assert torch.equal(weight, layer.dequantized_weight()), name


# -- fast checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "facts",
    [
        dict(mode="cast", bits=16),
        dict(mode="weight_only", bits=8, symmetric=False),
        dict(mode="dynamic", bits=4, symmetric=True, group_size=128),
        dict(mode="state_dict_weight_only", bits=4, symmetric=False),
        dict(mode="dynamic", bits=8, symmetric=True, layer_configs={"conv": {"kind": "QuantizedConv2d", "bits": 8}}),
        dict(mode="weight_only", bits=4, layer_configs={"fc": {"kind": "QuantizedLinear", "float_zero_point": True}}),
        dict(mode="dynamic", bits=8, layer_configs={"fc": {"kind": "QuantizedLinear", "smoothed_input": True}}),
    ],
    ids=["cast", "int8-asym", "int4-dynamic", "state-dict", "conv", "hqq-float-zp", "smoothed"],
)
def test_check_refuses_what_compressed_tensors_cannot_represent(facts):
    with pytest.raises(ConfigurationError) as err:
        ct_export.check(facts)
    assert err.value.suggestion
    with pytest.raises(ConfigurationError):
        ct_export.check(**facts)


def test_check_accepts_and_leaves_the_head_to_float():
    ct_export.check(mode="weight_only", bits=4, symmetric=False, group_size=128)
    # an asymmetric int8 head in an int4 run is written in float: not a reason to refuse
    ct_export.check(
        mode="weight_only",
        bits=4,
        symmetric=False,
        layer_configs={"lm_head": {"kind": "QuantizedLinear", "bits": 8, "symmetric": False}},
    )


def test_save_refuses_cast_and_non_transformers_models(tmp_path):
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ConfigurationError, match="cast") as err:
        mono_quant.quantize(mlp, bits=16).save(tmp_path / "a", format="compressed-tensors")
    assert err.value.suggestion
    with pytest.raises(ConfigurationError, match="transformers model"):
        mono_quant.quantize(mlp, bits=8, dynamic=True).save(tmp_path / "b", format="compressed-tensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 72, 100])
def test_packing_matches_compressed_tensors(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    torch.manual_seed(bits + cols)
    offset = 1 << (bits - 1)
    signed = torch.randint(-offset, offset, (12, cols), dtype=torch.int8)
    ours = ct_export.pack_to_int32(signed.to(torch.int32) + offset, bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([12, cols])), signed)
    # zero points: packed along the output dimension
    zp_ours = ct_export.pack_to_int32((signed.to(torch.int32) + offset).t().contiguous(), bits).t()
    assert torch.equal(zp_ours, pack_to_int32(signed, bits, packed_dim=0))


def test_partial_last_group_is_written_exactly():
    """576 features in groups of 128 (the last one 64 wide) become groups of 64 with each
    scale repeated: the dequantized weight is the same."""
    torch.manual_seed(0)
    rows, cols, group = 4, 576, 128
    q = torch.randint(0, 16, (rows, cols)).float()
    scale = torch.rand(rows, 5) + 0.1
    zp = torch.randint(0, 16, (rows, 5)).float()
    widths = torch.tensor([128, 128, 128, 128, 64])
    expected = (q - zp.repeat_interleave(widths, 1)) * scale.repeat_interleave(widths, 1)
    new_scale, new_group = ct_export.expand_group_qparams(scale, cols, group)
    new_zp, _ = ct_export.expand_group_qparams(zp, cols, group)
    assert new_group == 64 and new_scale.shape == (rows, 9)
    got = (q - new_zp.repeat_interleave(new_group, 1)) * new_scale.repeat_interleave(new_group, 1)
    assert torch.equal(got, expected)
    with pytest.raises(ConfigurationError):
        ct_export.expand_group_qparams(scale[:, :4], cols, group)


# -- MiniLM -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    from mono_quant.testing import SENTENCES, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, SENTENCES[:16])
    calibration = [dict(tokenize(tokenizer, SENTENCES[16:48]))]
    folder = tmp_path_factory.mktemp("ct_minilm")
    exports = {"float": embed(model, batch)}
    for case, options in MINILM_CASES.items():
        extra = {"calibration_data": calibration} if case == "w8a8-static" else {}
        result = mono_quant.quantize(model, **options, **extra)
        path = result.save(folder / case, format="compressed-tensors", tokenizer=tokenizer)
        exports[case] = (result, path, embed(result.model, batch))
    return exports, batch, folder


@pytest.mark.slow
@pytest.mark.minilm
@pytest.mark.consumer
@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_transformers_loads_our_weights_and_outputs(minilm_exports, case):
    from transformers import AutoModel

    from mono_quant.testing import cosine_stats, embed

    exports, batch, _ = minilm_exports
    result, path, ours = exports[case]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == EXPECTED_FORMAT[case]
    assert (path / "tokenizer.json").is_file()

    dense = load_consumer(path, AutoModel, dequantize=True)
    assert_same_weights(result.model, dense)
    weight_only = case.startswith(("w8a16", "w4a16"))
    if case == "w4a16-asym":
        # Known consumer bug (transformers 5.24 + compressed-tensors 0.20): the default path sizes
        # the packed zero point as unpacked and refuses the checkpoint. When this stops raising,
        # upstream fixed it: drop this branch and compare the default path too.
        with pytest.raises(RuntimeError, match="mismatched"):
            load_consumer(path, AutoModel, dequantize=False)
        consumer = dense
    else:
        consumer = load_consumer(path, AutoModel, dequantize=False)
    theirs = embed(consumer, batch)
    stats = cosine_stats(ours, theirs)
    to_float = cosine_stats(exports["float"], theirs)["mean"], cosine_stats(exports["float"], ours)["mean"]
    print(
        f"minilm {case}: transformers vs mono_quant cosine {stats}; "
        f"vs float: theirs {to_float[0]:.5f}, ours {to_float[1]:.5f}"
    )
    if weight_only:
        assert stats["min"] >= 0.999, stats
    elif case == "w8a8-dynamic":
        # the consumer's asymmetric token grid is ours up to x / s against x * (1 / s) at ties
        # (measured: cosine to ours 0.99946, to float 0.99889 both); its symmetric one is not
        assert stats["mean"] >= 0.999 and abs(to_float[0] - to_float[1]) <= 0.0005, (stats, to_float)
        groups = config["config_groups"].values()
        assert {group["input_activations"]["symmetric"] for group in groups} == {False}
    else:
        assert stats["mean"] >= 0.995 and stats["min"] >= 0.99, stats
        assert abs(to_float[0] - to_float[1]) <= 0.002, to_float
    if case == "w8a8-static":
        layer = result.model.encoder.layer[0].attention.self.query
        loaded = consumer.encoder.layer[0].attention.self.query
        assert torch.equal(loaded.input_scale.reshape(()), layer.input_scale)
        assert torch.equal(loaded.input_zero_point.reshape(()).to(torch.int32), layer.input_zero_point)


@pytest.mark.slow
@pytest.mark.minilm
@pytest.mark.consumer
def test_minilm_corrupted_tensor_is_caught(minilm_exports, tmp_path):
    """One tensor's rows reversed in model.safetensors: the weight comparison and the output
    comparison both fail (so the tests above can fail)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from mono_quant.testing import cosine_stats, embed

    exports, batch, _ = minilm_exports
    result, path, ours = exports["w4a16-sym"]
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight_packed"
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    consumer = load_consumer(broken, AutoModel, dequantize=False)
    dense = load_consumer(broken, AutoModel, dequantize=True)
    with pytest.raises(AssertionError):
        assert_same_weights(result.model, dense)
    stats = cosine_stats(ours, embed(consumer, batch))
    print(f"minilm corrupted: cosine {stats}")
    assert stats["min"] < 0.999


# -- SmolLM2 --------------------------------------------------------------------------------------------
SMOLLM2_CASES = {
    "w8a8-dynamic": dict(bits=8, dynamic=True, smoothing=0),
    "w8a8-dynamic-asym-folded": dict(bits=8, dynamic=True, smoothing_folded_only=True, activation_scheme="asymmetric"),
    # the default data-free smoothing, where it folds into norms / up_proj (what --format sets):
    # every layer but o_proj (grouped-query attention) smoothed, the folded scales in the norms
    "w8a8-dynamic-folded": dict(bits=8, dynamic=True, smoothing_folded_only=True),
    # the residual stream rotated into the weights (norms at 1, the head untied): a plain Llama
    "w8a8-dynamic-rotated": dict(bits=8, dynamic=True, smoothing_folded_only=True, rotation=True),
    # group 64 divides every SmolLM2 width. With 128, the 576-wide layers (partial last group)
    # are written as groups of 64 next to 1536-wide ones in groups of 128, and transformers'
    # dequantize path (the only one for asymmetric W4A16, see above) then fails to load.
    "w4a16-asym": dict(bits=4, group_size=64, method="rtn"),
}


class _TokenGridLinear(nn.Module):
    """A Linear with compressed-tensors' dynamic int8 per-token activations on a fixed float
    weight (``calculate_qparams`` and ``_quantize`` of compressed_tensors 0.20, values in
    [-128, 127]): symmetric, scale max|x| / 127.5; asymmetric, scale (max - min) / 255 over
    [min(x, 0), max(x, 0)] and zero point round(-128 - min / scale)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, symmetric: bool) -> None:
        super().__init__()
        self.weight, self.bias, self.symmetric = weight, bias, symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.5
            x_hat = (x / scale).round().clamp(-128, 127) * scale
        else:
            low, high = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
            scale = ((high - low) / 255).clamp(min=1e-12)
            zero = (-128 - low / scale).clamp(-128, 127).round()
            x_hat = ((x / scale + zero).round().clamp(-128, 127) - zero) * scale
        return nn.functional.linear(x_hat, self.weight, self.bias)


def _with_token_grid(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with our dequantized weights and compressed-tensors' activation grid."""
    import copy

    from mono_quant.modules import QuantizedEmbedding, QuantizedLinear

    emulated = copy.deepcopy(float_model)
    # float parameters of the result (norms that carry folded smoothing scales) replace the model's
    floats = dict(emulated.named_parameters())
    with torch.no_grad():
        for name, parameter in quantized.named_parameters():
            if name in floats and floats[name].shape == parameter.shape:
                floats[name].copy_(parameter)
    for name, module in quantized.named_modules():
        parent_name, _, child = name.rpartition(".")
        parent = emulated.get_submodule(parent_name) if parent_name else emulated
        if isinstance(module, QuantizedLinear) and module.config.activation == "dynamic":
            grid = _TokenGridLinear(module.dequantized_weight(), module.bias, module.config.activation_symmetric)
            setattr(parent, child, grid)
        elif isinstance(module, (QuantizedLinear, QuantizedEmbedding)):  # weight-only head: float activations
            getattr(parent, child).weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
    return emulated.eval()


@pytest.fixture(scope="module")
def smollm2_exports(smollm2, smollm2_eval_windows, tmp_path_factory):
    from mono_quant.testing import perplexity

    model, tokenizer = smollm2
    windows = smollm2_eval_windows[:1]
    folder = tmp_path_factory.mktemp("ct_smollm2")
    exports = {}
    for case, options in SMOLLM2_CASES.items():
        result = mono_quant.quantize(model, **options)
        path = result.save(folder / case, format="compressed-tensors", tokenizer=tokenizer)
        exports[case] = (result, path, perplexity(result.model, windows))
        del result.original
    return exports, windows


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.consumer
@pytest.mark.parametrize("case", list(SMOLLM2_CASES))
def test_smollm2_transformers_perplexity_matches_ours(smollm2, smollm2_exports, case):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mono_quant.testing import perplexity

    exports, windows = smollm2_exports
    result, path, ours = exports[case]
    if case == "w8a8-dynamic-rotated":
        assert result.info.metrics["rotation"]["untied_output_head"] > 0
    if case.startswith("w8a8-dynamic-"):  # q/k/v, gate/up and down_proj of 30 layers; o_proj has no fold
        smoothing = result.info.metrics["smoothing"]
        assert smoothing["folded_only"] and smoothing["input_scales"] == 0 and smoothing["layers"] == 30 * 6
    config = json.loads((path / "config.json").read_text())
    quantization = config["quantization_config"]
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    head = result.model.lm_head
    int4_run = case.startswith("w4")  # an int4 run's 8-bit head is written in float (see the exporter)
    if ct_export._head_unrepresentable("lm_head", head) is None and not int4_run:
        # A quantized head is written quantized, named in its group's targets, untied from the
        # (float) embedding.
        assert "lm_head" not in quantization["ignore"]
        from compressed_tensors.utils.match import match_name

        groups = quantization["config_groups"].values()
        assert any(match_name("lm_head", target) for group in groups for target in group["targets"])
        assert config["tie_word_embeddings"] is False
        assert "lm_head.weight_scale" in keys
    else:
        # the 8-bit head of an int4 run, or one the format cannot hold: written in float, ignored;
        # tied again when it equals the embedding.
        assert "lm_head" in quantization["ignore"]
        tied = torch.equal(head.dequantized_weight(), result.model.model.embed_tokens.dequantized_weight())
        assert config["tie_word_embeddings"] == tied and ("lm_head.weight" in keys) != tied
    assert "model.embed_tokens.weight" in keys

    if case == "w4a16-asym":
        with pytest.raises(RuntimeError, match="mismatched"):  # the known consumer bug, see the MiniLM test
            load_consumer(path, AutoModelForCausalLM, dequantize=False)
        consumer = load_consumer(path, AutoModelForCausalLM, dequantize=True)
        assert_same_weights(result.model, consumer)
        theirs = perplexity(consumer, windows)
        print(f"smollm2 {case}: perplexity mono_quant {ours:.4f}, transformers {theirs:.4f}")
        assert abs(theirs - ours) / ours <= 0.01
    else:
        consumer = load_consumer(path, AutoModelForCausalLM, dequantize=False)
        assert torch.equal(consumer.model.embed_tokens.weight, result.model.model.embed_tokens.dequantized_weight())
        theirs = perplexity(consumer, windows)
        # W8A8: the consumer quantizes activations per token on its own grid (max / 127.5 on
        # [-128, 127]; ours max / 127 on [-127, 127]). Perplexity swings by a few percent with
        # such grid details (ours 19.30, the consumer's grid 18.94 on this window), so the file
        # is proven by emulating the consumer's grid on our weights: that must match exactly.
        emulated = perplexity(_with_token_grid(smollm2[0], result.model), windows)
        print(
            f"smollm2 {case}: perplexity mono_quant {ours:.4f}, transformers {theirs:.4f}, "
            f"our weights on compressed-tensors' activation grid {emulated:.4f}"
        )
        assert abs(theirs - emulated) / emulated <= 1e-3
        assert abs(theirs - ours) / ours <= 0.03


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_float_head_is_written_dequantized_and_ignored(smollm2_exports, tmp_path):
    from safetensors import safe_open

    exports, _ = smollm2_exports
    result, _, _ = exports["w4a16-asym"]
    path = ct_export.export(result.model, tmp_path / "float-head", float_head=True)
    config = json.loads((path / "config.json").read_text())
    assert "lm_head" in config["quantization_config"]["ignore"]
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        head = handle.get_tensor("lm_head.weight") if "lm_head.weight" in keys else None
        embedding = handle.get_tensor("model.embed_tokens.weight")
    expected_head = result.model.lm_head.dequantized_weight()
    if torch.equal(expected_head, result.model.model.embed_tokens.dequantized_weight()):
        assert head is None and config["tie_word_embeddings"] is True  # one matrix, tied back on load
        assert torch.equal(embedding, expected_head)
    else:
        assert config["tie_word_embeddings"] is False
        assert torch.equal(head, expected_head)


def test_check_reads_quantize_options():
    options_module = pytest.importorskip("mono_quant.core.options")
    ct_export.check(options_module.QuantizeOptions(bits=4))
    ct_export.check(options_module.QuantizeOptions(bits=8, dynamic=True))
    with pytest.raises(ConfigurationError, match="asymmetric int8"):
        ct_export.check(options_module.QuantizeOptions(bits=8, weight_only=True, scheme="asymmetric"))
    with pytest.raises(ConfigurationError, match="cast"):
        ct_export.check(options_module.QuantizeOptions(bits=16))
