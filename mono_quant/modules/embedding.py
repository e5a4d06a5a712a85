"""QuantizedEmbedding: int8 per-row or int4 group-wise embedding tables.

Only the looked-up rows are dequantized, so a forward touches ``len(indices) x dim`` values
of the table, never the whole of it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import dequantize, expand_groups, unpack_int4
from mono_quant.errors import ConfigurationError
from mono_quant.modules.base import LayerQuantConfig, QuantizedModule, register_quantized_module

__all__ = ["QuantizedEmbedding"]


@register_quantized_module(nn.Embedding)
class QuantizedEmbedding(QuantizedModule):
    """An Embedding whose table is int8 (one scale per row) or int4 (groups along the row).

    Example:
        >>> emb = QuantizedEmbedding.from_float(nn.Embedding(100, 16), LayerQuantConfig(bits=8))
        >>> emb(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 16])
    """

    def __init__(self, module: nn.Embedding, config: LayerQuantConfig) -> None:
        super().__init__()
        if config.activation == "static" or config.activation == "dynamic":
            # An embedding's input is indices: there is no activation to quantize.
            config = dataclasses.replace(config, activation="none")
        if module.max_norm is not None:
            raise ConfigurationError(
                "embeddings with max_norm renormalise their weights in forward and cannot be quantized",
                suggestion="Exclude this layer (exclude=[name]).",
            )
        self.config = config
        self.num_embeddings = module.num_embeddings
        self.embedding_dim = module.embedding_dim
        self.padding_idx = module.padding_idx

    @classmethod
    def from_float(
        cls, module: nn.Embedding, config: LayerQuantConfig, weight_tensors: dict | None = None, **_
    ) -> QuantizedEmbedding:
        layer = cls(module, config)
        layer._store_weight(module.weight, layer.config, weight_tensors)
        return layer

    @classmethod
    def empty_like(cls, module: nn.Embedding, config: LayerQuantConfig) -> QuantizedEmbedding:
        layer = cls(module, config)
        device = module.weight.device if module.weight.device.type != "meta" else None
        layer._register_empty((module.num_embeddings, module.embedding_dim), layer.config, device)
        return layer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.qweight)
        scale = F.embedding(indices, self.weight_scale.view(self.num_embeddings, -1))
        zp = None
        if self.weight_zero_point is not None:
            zp = F.embedding(indices, self.weight_zero_point.view(self.num_embeddings, -1).to(torch.int32))
        if self.config.bits == 4:
            rows = unpack_int4(rows)
        if self.config.group_size:  # per-element qparams of the looked-up rows (partial last group too)
            group, dim = self.config.group_size, self.embedding_dim
            scale = expand_groups(scale, group, dim)
            zp = None if zp is None else expand_groups(zp, group, dim)
        return dequantize(rows, scale, zp)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + super().extra_repr()
