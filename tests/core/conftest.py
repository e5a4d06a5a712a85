"""Small float models shared by the core tests. Each fixture builds a fresh model in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mono_quant.testing import TinyLSTMModel


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm blocks, pooling and a Linear head: 3x16x16 images -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TwoInputModel(nn.Module):
    """Takes ``(x, scale)`` positionally or by keyword, to test calibration batch shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if scale is not None:
            h = h * scale
        return self.fc2(h)


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    # Non-trivial BatchNorm statistics, so that a model changed by calibration would show it.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.fixture
def lstm_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyLSTMModel().eval()


@pytest.fixture
def two_input_model() -> nn.Module:
    torch.manual_seed(0)
    return TwoInputModel().eval()
