"""Group bookkeeping shared by the algorithms: partial last groups, RTN and dequantization.

A weight ``[N, K]`` quantized in groups of ``g`` along the input axis has ``G = ceil(K / g)``
groups; when ``g`` does not divide ``K`` the last group holds the ``K - (G - 1) * g`` tail
columns. ``scale`` / ``zero_point`` are ``[N, G]`` either way. ``schemes.quantize_weight`` only
takes whole groups (for now), so the full columns and the tail are quantized apart here and
put back together; :func:`dequantize_groups` undoes any of these layouts, float zero points
included (HQQ's).
"""

from __future__ import annotations

import torch

from mono_quant.core.schemes import PerChannel, PerGroup, QuantizedTensor, QuantSpec, quantize_weight

__all__ = ["group_bounds", "rtn_quantize_weight", "dequantize_groups", "expand_group_qparam"]


def group_bounds(columns: int, group_size: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every group along an input axis of ``columns``.

    ``group_size=None`` (per channel) is one group over every column.

    Example:
        >>> group_bounds(576, 128)[-1]
        (512, 576)
    """
    if group_size is None or group_size >= columns:
        return [(0, columns)]
    return [(start, min(start + group_size, columns)) for start in range(0, columns, group_size)]


def rtn_quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, group_size: int | None, clip_search_steps: int = 0
) -> QuantizedTensor:
    """Round-to-nearest ``weight [N, K]`` per channel (``group_size=None``) or per group,
    partial last group included; qparams from min/max or the MSE clip search.

    Returns scale/zero point ``[N]`` per channel, ``[N, ceil(K / g)]`` per group.
    """
    if group_size is None:
        return quantize_weight(weight, spec, PerChannel(), clip_search_steps)
    columns = weight.shape[1]
    full = (columns // group_size) * group_size
    parts = []
    if full:
        parts.append(quantize_weight(weight[:, :full], spec, PerGroup(group_size), clip_search_steps))
    if full < columns:  # the tail: one group of its own, i.e. "per channel" over those columns
        tail = quantize_weight(weight[:, full:], spec, PerChannel(), clip_search_steps)
        tail.scale = tail.scale.unsqueeze(1)
        tail.zero_point = tail.zero_point.unsqueeze(1) if tail.zero_point is not None else None
        parts.append(tail)
    if len(parts) == 1 and full:
        return parts[0]
    zero_point = None
    if parts[0].zero_point is not None:
        zero_point = torch.cat([p.zero_point for p in parts], dim=1)
    return QuantizedTensor(
        torch.cat([p.qdata for p in parts], dim=1),
        torch.cat([p.scale for p in parts], dim=1),
        zero_point,
        spec,
        PerGroup(group_size),
    )


def expand_group_qparam(qparam: torch.Tensor, columns: int, group_size: int) -> torch.Tensor:
    """``[N, G]`` per-group values -> ``[N, K]`` (one per column), partial last group included."""
    return qparam.repeat_interleave(group_size, dim=1)[:, :columns]


def dequantize_groups(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` of a 2-D :class:`QuantizedTensor` in ``dtype``: per channel
    or per group with a partial last group; integer or float zero points."""
    q = qt.qdata.float()
    columns = q.shape[1]
    if isinstance(qt.granularity, PerGroup):
        scale = expand_group_qparam(qt.scale.float(), columns, qt.granularity.group_size)
        zero = None
        if qt.zero_point is not None:
            zero = expand_group_qparam(qt.zero_point.float(), columns, qt.granularity.group_size)
    else:
        scale = qt.scale.float().reshape(-1, 1)
        zero = qt.zero_point.float().reshape(-1, 1) if qt.zero_point is not None else None
    if zero is not None:
        q = q.sub_(zero)
    return q.mul_(scale).to(dtype)
