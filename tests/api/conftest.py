"""Small float models and inputs for the tests of mono_quant.api (quantize() and its result)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0) -> nn.Module:
    """128 -> 128 -> 128 -> 10: every in_features divides the default int4 group size (128)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


class ExplodingModel(nn.Module):
    """Its forward always raises: calibration cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in forward")


class UncopyableModel(nn.Module):
    """Holds a lock as an attribute, so the quantizer's deepcopy of the model fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def mlp_inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(16, 128)


@pytest.fixture
def calibration() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(100, 128)
