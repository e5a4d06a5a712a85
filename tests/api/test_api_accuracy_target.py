"""The accuracy target on real models: ``max_accuracy_loss`` must hold on the eval data it was
given (text / sentences never calibrated on), the trials must show the search doing work, the
compression kept must beat int8's, and ``info.layer_overrides`` must reproduce the result."""

from __future__ import annotations

import pytest
import torch

from mono_quant import quantize
from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, perplexity, tokenize

pytestmark = pytest.mark.slow


@pytest.mark.smollm2
@pytest.mark.timeout(1800)  # ~4 min on a quiet 2-core machine; > 10 on a loaded one
def test_smollm2_int4_within_one_percent(smollm2, smollm2_calibration_windows, smollm2_eval_windows):
    """Plain int4 g128 costs SmolLM2 ~10% perplexity (HQQ weighted by the calibration data's
    statistics, the search's int4; round-to-nearest ~25%); the target is 1% on held-out text."""
    model, _ = smollm2
    calibration = [smollm2_calibration_windows[i : i + 4] for i in range(0, 16, 4)]
    evaluation = [smollm2_eval_windows[:2], smollm2_eval_windows[2:4]]
    result = quantize(model, bits=4, calibration_data=calibration, eval_data=evaluation, max_accuracy_loss=0.01)
    assert result.success, result.errors
    target = result.info.metrics["accuracy_target"]
    assert target["metric"] == "perplexity" and target["met"], target
    trials = target["trials"]
    assert trials[0]["moved"] == 0 and trials[0]["loss"] > 0.05  # int4 as asked misses by far
    assert len(trials) <= 12
    # measured independently on the same eval windows
    fp32 = perplexity(model, smollm2_eval_windows[:4], batch_size=2)
    quantized = perplexity(result.model, smollm2_eval_windows[:4], batch_size=2)
    assert quantized <= fp32 * 1.01, (quantized, fp32)
    # what moved, and what compression was kept (int8 everywhere would be ~3.9x of fp32)
    overrides = result.info.layer_overrides
    assert overrides and target["moved_layers"] == len(overrides)
    assert result.info.compression_ratio > 3.5, result.info.compression_ratio
    # the precisions are reusable: the same layout and size; data-free, int4 is HQQ weighted by
    # random-token statistics rather than the calibration data's, so close but not bit-equal
    again = quantize(model, bits=4, layer_overrides=overrides)
    assert again.info.quantized_size_bytes == result.info.quantized_size_bytes
    assert perplexity(again.model, smollm2_eval_windows[:4], batch_size=2) <= fp32 * 1.03


@pytest.mark.minilm
def test_minilm_int4_target_on_held_out_sentences():
    """MiniLM int4 g128 data-free is ~0.962 embedding cosine; ask for 0.99 on sentences the
    ranking never saw."""
    model, tokenizer = load_minilm()
    calibration = [tokenize(tokenizer, SENTENCES[i : i + 16]) for i in range(0, 32, 16)]
    held_out = tokenize(tokenizer, SENTENCES[32:64])
    result = quantize(model, bits=4, calibration_data=calibration, eval_data=[held_out], max_accuracy_loss=0.01)
    target = result.info.metrics["accuracy_target"]
    assert target["metric"] == "embedding_cosine" and target["met"], target
    assert target["trials"][0]["loss"] > 0.01
    with torch.inference_mode():
        stats = cosine_stats(embed(model, held_out), embed(result.model, held_out))
    assert stats["mean"] >= 0.99, stats
    assert result.info.compression_ratio > 2.0
