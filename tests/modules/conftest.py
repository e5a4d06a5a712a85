"""Helpers for the quantized-layer tests: reference maths written independently of the kernels.

Tests get them through the ``ref`` fixture (test files cannot import conftest in importlib mode).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mono_quant.modules import LayerQuantConfig, QuantizedModule, build_quantized_module, kernels
from mono_quant.modules import linear as linear_module


def fake_quantize_per_token(x2d: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 round trip: what dynamic activation quantization computes."""
    scale = x2d.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x2d / scale) * scale


def fake_quantize_per_token_asymmetric(x2d: torch.Tensor) -> torch.Tensor:
    """Asymmetric per-row int8 round trip: each row's [min(x, 0), max(x, 0)] on 256 levels
    with its own integer zero point (``activation_symmetric=False`` in dynamic mode). Values are
    divided by multiplying with the fp32 reciprocal of the scale, as the kernels do (a true
    division rounds a value lying within an ulp of a tie the other way)."""
    low = x2d.amin(dim=1, keepdim=True).clamp(max=0)
    high = x2d.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / 255
    inverse = 1 / scale
    zero_point = torch.round(-low * inverse)
    return (torch.clamp(torch.round(x2d * inverse) + zero_point, 0, 255) - zero_point) * scale


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, symmetric: bool):
    """Per-tensor int8 round trip with fixed qparams: what static activation quantization computes."""
    qmin = -127 if symmetric else -128
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, 127)
    return (q - zero_point) * scale


def rebuild(layer: QuantizedModule, float_module: nn.Module) -> QuantizedModule:
    """The load path: config from the layer's metadata, an empty layer, load_state_dict(strict)."""
    config = LayerQuantConfig.from_dict(layer.metadata())
    empty = build_quantized_module(float_module, config, kind=layer.metadata()["kind"])
    empty.load_state_dict(layer.state_dict(), strict=True)
    return empty


@pytest.fixture
def ref() -> SimpleNamespace:
    return SimpleNamespace(
        per_token=fake_quantize_per_token,
        per_token_asymmetric=fake_quantize_per_token_asymmetric,
        static=fake_quantize_static,
        rebuild=rebuild,
    )


@pytest.fixture(params=["onednn", "fbgemm", None], ids=["onednn", "fbgemm", "int_mm"])
def int8_engine(request, monkeypatch) -> str | None:
    """Each CPU int8 engine in turn (skipped where this torch build lacks it), then none: the
    ``_int_mm`` path of builds without either. Layers built inside the test use it."""
    engine = request.param
    if engine is not None and not kernels.available_int8_engines()[engine]:
        pytest.skip(f"this torch build has no {engine} int8 linear")
    monkeypatch.setattr(linear_module, "cpu_int8_engine", lambda: engine)
    return engine
