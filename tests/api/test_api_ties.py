"""Tied weights and odd hidden sizes (what real LLMs have): quantized once, never an empty
weight, the same tensors whichever way the model arrives (module, state_dict, streamed file)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mono_quant import load_quantized, quantize, quantize_file
from mono_quant.io.formats import load_model, read_metadata
from tests.core.test_plan import TiedLM


@pytest.fixture
def lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 7))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4},
        {"bits": 4, "exclude": ["lm_head"]},
        {"bits": 8, "dynamic": True},
        {"bits": 8, "exclude": ["embed*"], "dynamic": True},
    ],
    ids=["int4", "int4-float-head", "int8", "int8-float-embedding"],
)
def test_tied_models_run_after_quantization_whichever_side_stays_float(lm, ids, kwargs):
    result = quantize(lm, **kwargs)
    assert result
    with torch.inference_mode():
        out, ref = result.model(ids), lm(ids)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98
    assert torch.equal(lm.lm_head.weight, lm.embed_tokens.weight)  # the caller's model untouched
    for name in ("embed_tokens", "lm_head"):
        layer = getattr(result.model, name)
        weight = getattr(layer, "weight", None)
        assert weight is None or weight.numel() > 0, f"{name} was left with an empty weight"


def test_a_tie_is_quantized_once_stored_once_and_restored(lm, ids, tmp_path):
    result = quantize(lm, bits=4)
    head, embed = result.model.lm_head, result.model.embed_tokens
    assert head.tied_to == "embed_tokens"
    assert torch.equal(head.dequantized_weight(), embed.dequantized_weight())
    path = result.save(tmp_path / "lm.safetensors")
    stored = load_model(path)
    assert "lm_head.qweight" not in stored and "embed_tokens.qweight" in stored
    assert read_metadata(path)["layers"]["lm_head"]["tied_to"] == "embed_tokens"
    restored = load_quantized(path, TiedLM())
    assert torch.equal(restored.lm_head.dequantized_weight(), restored.embed_tokens.dequantized_weight())
    with torch.inference_mode():
        assert torch.equal(restored(ids), result.model(ids))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4},
        {"bits": 4, "group_size": 64, "scheme": "symmetric"},
        {"bits": 8, "dynamic": True},
        {"bits": 8, "weight_only": True},
        {"bits": 16},
    ],
    ids=["int4", "int4-g64-sym", "int8-dynamic", "int8-weight-only", "fp16"],
)
def test_module_state_dict_and_file_paths_give_identical_tensors(lm, tmp_path, kwargs):
    from_module = quantize(lm, **kwargs)
    module_file = from_module.save(tmp_path / "module.safetensors")
    from_state_dict = quantize(lm.state_dict(), **kwargs).save(tmp_path / "state_dict.safetensors")
    source = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}, source)
    streamed = quantize_file(source, tmp_path / "file.safetensors", **kwargs)
    module_tensors = load_model(module_file)
    for other in (from_state_dict, streamed):
        other_tensors = load_model(other)
        # a safetensors file holds a tie once (no lm_head.weight): compare what both have
        common = set(module_tensors) & set(other_tensors)
        assert {k for k in module_tensors if not k.startswith("lm_head")} <= common
        for key in common:
            assert torch.equal(module_tensors[key], other_tensors[key]), key
