"""Real files for the CLI tests: a float model saved in several formats and calibration data."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn


def make_mlp(seed: int = 0) -> nn.Sequential:
    """Layers "0", "2", "4"; in_features 128, 128, 64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(make_mlp().state_dict(), path)
    return path


@pytest.fixture
def model_pt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(make_mlp().state_dict(), path)
    return path


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calib.safetensors"
    torch.manual_seed(3)
    safetensors.torch.save_file({"x": torch.randn(64, 128)}, path)
    return path


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """A Hugging Face folder (config.json + model.safetensors) of a 2-layer BERT, and a
    calibration file of input_ids / attention_mask for it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    calibration = tmp_path / "tokens.safetensors"
    ids = torch.randint(1, 100, (16, 12))
    mask = torch.ones_like(ids)
    mask[8:, 9:] = 0
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": mask}, calibration)
    return folder, calibration, model
