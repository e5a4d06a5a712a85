"""Float models (built fresh from a seed) and their inputs for the tests of mono_quant.io.

A "skeleton" is the same architecture built from another seed: its weights differ from the
original's, so a bit-exact output after ``load_quantized`` proves the file replaced them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mono_quant.testing import TinyLSTMModel


class MLP(nn.Module):
    """128 -> 128 -> 64 -> 10; in_features divisible by the int4 group sizes used here."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv2d + BatchNorm, pooling and a Linear head: 3x16x16 images -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


ARCHITECTURES: dict[str, tuple[type[nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (MLP, lambda n: torch.randn(n, 128)),
    "cnn": (CNN, lambda n: torch.randn(n, 3, 16, 16)),
    "lstm": (TinyLSTMModel, lambda n: torch.randint(0, 50, (n, 7))),
}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[kind][0]()
    if kind == "cnn":  # non-trivial BatchNorm statistics
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(8, 3, 16, 16))
    return model.eval()


def inputs(kind: str, n: int = 8, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return ARCHITECTURES[kind][1](n)


@pytest.fixture
def mlp() -> nn.Module:
    return build("mlp")


@pytest.fixture
def mlp_inputs() -> torch.Tensor:
    return inputs("mlp")
