"""Pure quantization maths: qparams, quantize / dequantize, int4 packing.

Everything here is a function of tensors, with no module state, so it can be tested alone and
reused by the observers, the quantized layers and the streaming file quantizer.

Conventions (affine quantization)::

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

* int8 symmetric:  q in [-127, 127], zero_point = 0 (the range is kept symmetric on purpose,
  so that -x quantizes to -q and int8 x int8 products never see -128).
* int8 asymmetric: q in [-128, 127], zero_point in the same range.
* int4:            stored unsigned, q in [0, 15]; symmetric int4 uses [1, 15] with
  zero_point = 8 (so the grid is -7..7 around zero), asymmetric uses [0, 15].
* The range [min, max] is always widened to contain 0, so zero is exactly representable
  (padding and ReLU outputs stay exact).

Granularity is a small frozen object: :class:`PerTensor`, :class:`PerChannel` (one scale per
row of a weight: the output axis) or :class:`PerGroup` (``group_size`` consecutive elements
along the last, input axis share a scale).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

from mono_quant.core.options import DEFAULT_CLIP_SEARCH_STEPS
from mono_quant.core.scratch import scratch
from mono_quant.errors import ConfigurationError, InputError

__all__ = [
    "QuantSpec",
    "INT8_SYMMETRIC",
    "INT8_ASYMMETRIC",
    "INT4_SYMMETRIC",
    "INT4_ASYMMETRIC",
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "QuantizedTensor",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_weight",
    "dequantize_weight",
    "rtn_quantize_weight",
    "dequantize_groups",
    "group_bounds",
    "pack_int4",
    "unpack_int4",
    "sqnr",
    "expand_groups",
    "regroup",
    "DEFAULT_CLIP_SEARCH_STEPS",
]

# Smallest scale we ever produce: an all-zero block quantizes to zeros instead of NaN.
_MIN_SCALE = 1e-12
# Elements processed per block. Measured on this project's CPU (2 threads, 4096x4096 fp32):
# int8 per-channel runs at 6.3 / 7.7 / 9.4 / 10.2 GB/s with blocks of 64 / 128 / 256 / 512
# rows: per-op overhead and thread start-up, not cache misses, dominate small blocks.
_CPU_BLOCK_ELEMENTS = 1 << 21
# The clipping search evaluates all candidates of a block at once: cap that temporary.
_SEARCH_BLOCK_ELEMENTS = 1 << 22
_DEVICE_BLOCK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: bit width and whether it is symmetric around zero.

    Example:
        >>> QuantSpec(bits=8, symmetric=True).qmin, QuantSpec(8, True).qmax
        (-127, 127)
    """

    bits: int
    symmetric: bool

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigurationError(
                f"integer quantization supports 4 or 8 bits, got bits={self.bits!r}",
                suggestion="Use bits=8 (int8) or bits=4 (int4 group-wise weights).",
            )

    @property
    def qmin(self) -> int:
        if self.bits == 8:
            return -127 if self.symmetric else -128
        return 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 15

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of unpacked integer values: int8 for 8 bits, uint8 (0..15) for 4 bits."""
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def symmetric_zero_point(self) -> int:
        """The fixed zero point of the symmetric grid (0 for int8, 8 for unsigned int4)."""
        return 0 if self.bits == 8 else 8

    @property
    def name(self) -> str:
        return f"int{self.bits}_{'sym' if self.symmetric else 'asym'}"


INT8_SYMMETRIC = QuantSpec(8, True)
INT8_ASYMMETRIC = QuantSpec(8, False)
INT4_SYMMETRIC = QuantSpec(4, True)
INT4_ASYMMETRIC = QuantSpec(4, False)


class Granularity:
    """Base of the granularity objects; ``name`` goes into file metadata."""

    name: str = ""


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    name = "per_tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per slice along ``axis`` (0 = output channels of a weight)."""

    axis: int = 0
    name = "per_channel"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of the last (input) axis."""

    group_size: int = 128
    name = "per_group"

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigurationError(
                f"group_size must be an integer >= 2, got {self.group_size!r}",
                suggestion="Use group_size=32, 64 or 128 (128 is the default; see QuantizeOptions).",
            )


@dataclass
class QuantizedTensor:
    """Integer values plus the qparams that map them back to real numbers.

    ``qdata`` is unpacked (int8, or uint8 0..15 for int4), or with ``packed`` int4 two per byte
    as :func:`pack_int4` lays them out (``[rows, K // 2]``: what the stored layout holds, made
    without the unpacked temporary). ``scale`` / ``zero_point`` have the shape of the
    granularity: ``[]`` per tensor, ``[rows]`` per channel, ``[rows, K // g]`` per group.
    ``zero_point`` is None for symmetric int8 (it is 0 everywhere).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    granularity: Granularity
    packed: bool = False

    @property
    def shape(self) -> torch.Size:
        """The quantized tensor's shape (``qdata``'s, unpacked)."""
        if not self.packed:
            return self.qdata.shape
        return torch.Size((*self.qdata.shape[:-1], 2 * self.qdata.shape[-1]))

    def unpacked(self) -> torch.Tensor:
        """``qdata`` with one value per element."""
        return unpack_int4(self.qdata) if self.packed else self.qdata

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self, dtype)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (elementwise, any shape).

    The range is first widened to contain zero. Returns fp32 ``scale`` and an int32
    ``zero_point`` of the same shape as the inputs.

    Example:
        >>> s, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), INT8_ASYMMETRIC)
        >>> round(float(s), 6), int(zp)
        (0.015686, -64)
    """
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        half_range = (spec.qmax - spec.qmin) / 2
        scale = torch.maximum(-min_val, max_val) / half_range
        scale = scale.clamp_(min=_MIN_SCALE)
        zero_point = torch.full_like(scale, spec.symmetric_zero_point, dtype=torch.int32)
        return scale, zero_point
    # Divide before subtracting: max - min overflows to inf for ranges past half of fp32's.
    levels = spec.qmax - spec.qmin
    scale = (max_val / levels - min_val / levels).clamp_(min=_MIN_SCALE)
    zero_point = torch.round(spec.qmin - min_val / scale).clamp_(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` in ``spec.storage_dtype``.

    ``scale`` and ``zero_point`` broadcast against ``x``.
    """
    q = torch.div(x.float(), scale).round_()
    if zero_point is not None:
        q.add_(zero_point)
    return q.clamp_(spec.qmin, spec.qmax).to(spec.storage_dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``dtype``; ``scale``/``zero_point`` broadcast."""
    x = q.to(torch.float32)
    if zero_point is not None:
        x = x.sub_(zero_point)
    return x.mul_(scale).to(dtype)


def _check_weight(weight: torch.Tensor, granularity: Granularity) -> None:
    if not weight.is_floating_point():
        raise InputError(
            f"expected a floating-point weight, got dtype {weight.dtype}",
            suggestion="Quantize the float model, not one that is already quantized.",
        )
    if isinstance(granularity, PerGroup) and weight.dim() != 2:
        raise InputError(
            f"group-wise quantization needs a 2-D weight, got shape {tuple(weight.shape)}",
            suggestion="Use per-channel quantization for this layer.",
        )


def _clip_errors(
    tile: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, factors: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(error, scale, zero_point)`` for ranges ``[lo, hi] * factors``, all candidates at once.

    ``tile [rows, groups, group]``, ``factors [C, rows or 1, groups or 1]``. The error is
    computed in grid units, ``e = clamp(round(t), qmin, qmax) - t`` with ``t = x / s + z``
    (``round(x / s) + z == round(x / s + z)`` for an integer ``z``), and scaled by ``s^2`` per
    group: seven cheap passes over the candidates (clamping to per-group tensor bounds instead
    would be ~10x slower on the CPU).
    """
    scale, zp = choose_qparams(lo.unsqueeze(0) * factors, hi.unsqueeze(0) * factors, spec)  # [C, rows, groups]
    shifted = torch.div(tile.unsqueeze(0), scale.unsqueeze(-1)).add_(zp.unsqueeze(-1))
    units = torch.round(shifted).clamp_(spec.qmin, spec.qmax).sub_(shifted).square_().sum(dim=-1)
    return units.mul_(scale.square()), scale, zp


def _argmin_first(values: torch.Tensor) -> torch.Tensor:
    """``values.argmin(dim=0, keepdim=True)``; reducing over a contiguous last axis is ~20x
    faster on the CPU than over the leading one."""
    return values.movedim(0, -1).contiguous().argmin(dim=-1).unsqueeze(0)


def _search_clipping(
    tile: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group qparams minimising the squared error over clipping ranges ``[lo, hi] * f``.

    Coarse to fine: ``steps - steps // 2`` factors spread over [1.0, 0.7], then ``steps // 2``
    around each group's best. Clipping a few extreme weights buys every other weight a finer
    grid: for int4 g128 on MiniLM, +0.5 dB weight SQNR and +0.003 mean embedding cosine over
    plain min/max.
    """
    coarse_steps = max(1, steps - steps // 2)
    coarse = torch.linspace(1.0, 0.7, coarse_steps, device=tile.device).view(-1, 1, 1)
    err, scale, zp = _clip_errors(tile, lo, hi, coarse, spec)
    best = _argmin_first(err)
    best_err, best_scale, best_zp = err.gather(0, best), scale.gather(0, best), zp.gather(0, best)
    fine_steps = steps // 2
    if fine_steps:
        spacing = 0.3 / max(coarse_steps - 1, 1)
        # fine_steps + 1 points around the coarse best, minus the middle one (the best itself)
        grid = torch.linspace(-spacing / 2, spacing / 2, fine_steps + 1, device=tile.device)
        middle = fine_steps // 2
        offsets = torch.cat([grid[:middle], grid[middle + 1 :]]).view(-1, 1, 1)
        factors = (coarse.view(-1).gather(0, best.view(-1)).view(best.shape[1:]).unsqueeze(0) + offsets).clamp_(max=1.0)
        fine_err, fine_scale, fine_zp = _clip_errors(tile, lo, hi, factors, spec)
        pick = _argmin_first(fine_err)
        candidate_err = fine_err.gather(0, pick)
        better = candidate_err < best_err
        best_scale = torch.where(better, fine_scale.gather(0, pick), best_scale)
        best_zp = torch.where(better, fine_zp.gather(0, pick), best_zp)
    return best_scale.squeeze(0), best_zp.squeeze(0)


def quantize_weight(
    weight: torch.Tensor,
    spec: QuantSpec,
    granularity: Granularity = PerChannel(),
    clip_search_steps: int = 0,
    packed: bool = False,
) -> QuantizedTensor:
    """Quantize a weight tensor (``[out, ...]``) with min/max qparams.

    With ``clip_search_steps > 0`` each row/group instead gets the clipping range, among
    ``clip_search_steps`` shrinkings of its min/max down to 70%, that minimises its squared
    quantization error (MSE clipping search; used for int4, where it matters).

    Works block by block over the output rows, so the temporary memory is a few MiB whatever
    the weight size (one read of the weight, one write of the result, and the passes in
    between on a block-sized buffer). The input is never modified.

    Shapes: per tensor -> scale ``[]``; per channel -> ``[out]``; per group (2-D weight
    ``[out, in]``) -> ``[out, in // group_size]``.

    ``packed`` (4-bit specs): ``qdata`` comes packed two per byte (:func:`pack_int4`), each
    block packed as it is rounded, so the unpacked codes never exist at full size. In a fresh
    process that is most of int4's cost: every new tensor faults its pages in, and the unpacked
    codes plus the packing's temporaries were 5x the packed result (16 x 4096 x 4096 on Zen 4:
    160k minor page faults -> 70k with the other changes of bench/RESULTS.md's session 7).

    Example:
        >>> w = torch.randn(16, 64)
        >>> qt = quantize_weight(w, INT4_ASYMMETRIC, PerGroup(32))
        >>> qt.qdata.shape, qt.scale.shape
        (torch.Size([16, 64]), torch.Size([16, 2]))
    """
    _check_weight(weight, granularity)
    packed = packed and spec.bits == 4
    if packed and not _packs_per_block(weight, granularity):
        qt = quantize_weight(weight, spec, granularity, clip_search_steps)
        return dataclasses.replace(qt, qdata=pack_int4(qt.qdata), packed=True)
    if isinstance(granularity, PerTensor):
        lo, hi = torch.aminmax(weight.detach())
        scale, zero_point = choose_qparams(lo, hi, spec)
        zp = None if spec.symmetric and spec.bits == 8 else zero_point
        q = quantize(weight.detach(), scale, zp, spec)
        return QuantizedTensor(q, scale, zp, spec, granularity)
    if isinstance(granularity, PerChannel) and granularity.axis != 0:
        moved = weight.detach().movedim(granularity.axis, 0).contiguous()
        inner = quantize_weight(moved, spec, PerChannel(0))
        inner.qdata = inner.qdata.movedim(0, granularity.axis).contiguous()
        inner.granularity = granularity
        return inner

    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1)
    cols = flat.shape[1]
    if isinstance(granularity, PerGroup) and cols % granularity.group_size and cols > granularity.group_size:
        return _quantize_partial_groups(weight.detach(), spec, granularity, clip_search_steps)
    group = min(granularity.group_size, cols) if isinstance(granularity, PerGroup) else cols
    groups = cols // group
    device = weight.device
    q_out = torch.empty((rows, cols // 2 if packed else cols), dtype=spec.storage_dtype, device=device)
    scale_out = torch.empty((rows, groups), dtype=torch.float32, device=device)
    keep_zp = not (spec.symmetric and spec.bits == 8)
    zp_out = torch.empty((rows, groups), dtype=torch.int32, device=device) if keep_zp else None

    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    if clip_search_steps:  # the search holds every candidate of a block at once
        search_budget = _SEARCH_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
        budget = min(budget, search_budget // clip_search_steps)
    block = max(1, budget // max(cols, 1))
    quantize_block = _block_kernel(device, clip_search_steps)
    work = codes = words = None
    if quantize_block is _quantize_block:
        work = scratch("quantize_weight.work", (min(block, rows), groups, group), torch.float32, device)
    if packed:  # one block's codes and the packing's int16 words, reused by every block
        codes = scratch("quantize_weight.codes", (min(block, rows), cols), torch.uint8, device)
        words = scratch("quantize_weight.words", (min(block, rows), cols // 2), torch.int16, device)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        n = stop - start
        source = flat[start:stop].view(n, groups, group)
        destination = (codes[:n] if packed else q_out[start:stop]).view(n, groups, group)
        if work is None:
            q, scale, zero_point = quantize_block(source, spec, clip_search_steps)
            destination.copy_(q)
        else:  # rounded in place in ``work``, cast on the way into the output
            _, scale, zero_point = quantize_block(source, spec, clip_search_steps, work[:n], destination)
        if packed:
            _pack_int4_into(codes[:n], q_out[start:stop], words[:n])
        scale_out[start:stop] = scale
        if keep_zp:
            zp_out[start:stop] = zero_point

    if not packed:
        q_out = q_out.view(weight.shape)
    if not isinstance(granularity, PerGroup):
        scale_out = scale_out.view(rows)
        zp_out = zp_out.view(rows) if zp_out is not None else None
    return QuantizedTensor(q_out, scale_out, zp_out, spec, granularity, packed)


def _packs_per_block(weight: torch.Tensor, granularity: Granularity) -> bool:
    """Whether :func:`quantize_weight`'s block loop can pack as it goes: a 2-D weight on the
    CPU (the eager block function), per group or per channel on axis 0, whole groups, an even
    width. Elsewhere the codes are packed once at the end."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.shape[1] % 2:
        return False
    if isinstance(granularity, PerGroup):
        cols = weight.shape[1]
        return not (cols % granularity.group_size and cols > granularity.group_size)
    return isinstance(granularity, PerChannel) and granularity.axis == 0


def _quantize_partial_groups(
    weight: torch.Tensor, spec: QuantSpec, granularity: PerGroup, clip_search_steps: int
) -> QuantizedTensor:
    """Group-wise quantization of ``[out, in]`` where ``group_size`` does not divide ``in``:
    the whole groups as usual, the last ``in % group_size`` columns as one partial group
    (its own range, its own scale); scales ``[out, ceil(in / group_size)]``."""
    group = granularity.group_size
    full = (weight.shape[1] // group) * group
    head = quantize_weight(weight[:, :full], spec, granularity, clip_search_steps)
    tail = quantize_weight(weight[:, full:], spec, PerGroup(group), clip_search_steps)  # one group
    zero_point = None if head.zero_point is None else torch.cat([head.zero_point, tail.zero_point], dim=1)
    return QuantizedTensor(
        torch.cat([head.qdata, tail.qdata], dim=1),
        torch.cat([head.scale, tail.scale], dim=1),
        zero_point,
        spec,
        granularity,
    )


def rtn_quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, group_size: int | None, clip_search_steps: int = 0
) -> QuantizedTensor:
    """Round-to-nearest ``weight [N, K]`` per channel (``group_size=None``) or per group
    (partial last group included): :func:`quantize_weight` named by group size, the way the
    algorithms (GPTQ, HQQ) hold their configuration.

    Example:
        >>> rtn_quantize_weight(torch.randn(8, 320), INT4_ASYMMETRIC, 128).scale.shape
        torch.Size([8, 3])
    """
    granularity = PerChannel() if group_size is None else PerGroup(group_size)
    return quantize_weight(weight, spec, granularity, clip_search_steps)


def group_bounds(columns: int, group_size: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every group along an input axis of ``columns``; the last
    one holds the tail when ``group_size`` does not divide ``columns``. ``group_size=None``
    (per channel) is one group over every column.

    Example:
        >>> group_bounds(576, 128)[-1]
        (512, 576)
    """
    if group_size is None or group_size >= columns:
        return [(0, columns)]
    return [(start, min(start + group_size, columns)) for start in range(0, columns, group_size)]


def expand_groups(qparam: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group qparams ``[out, ceil(in / g)]`` -> per-element ``[out, in]`` (partial last group
    included): each group's value repeated over its columns."""
    return qparam.repeat_interleave(group_size, dim=-1)[..., :in_features]


def regroup(qparam: torch.Tensor, group_size: int, kernel_group: int, in_features: int) -> torch.Tensor:
    """Per-group qparams ``[out, ceil(in / group_size)]`` restated for groups of
    ``kernel_group`` (which divides ``group_size`` and ``in_features``): each value repeated
    ``group_size // kernel_group`` times. Exact: a kernel that only takes whole groups then
    computes a partial last group too."""
    return qparam.repeat_interleave(group_size // kernel_group, dim=-1)[..., : in_features // kernel_group]


def _quantize_block(
    source: torch.Tensor,
    spec: QuantSpec,
    clip_search_steps: int = 0,
    work: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block ``[rows, groups, group]`` -> ``(q, scale, zero_point)``, qparams per group.

    ``work``, a float32 buffer of the block's shape, saves allocating one per block (on the
    CPU that halves the time: fresh pages fault in). ``out`` (``spec.storage_dtype``, the
    block's shape) receives ``q``: the cast then happens in that one copy, with no integer
    temporary. Without them the function is pure, so ``torch.compile`` can fuse it into a
    single pass on GPUs (see :func:`_block_kernel`).
    """
    # amin + amax, not aminmax(dim=...): the latter takes a slow path on the CPU
    # (measured 15x slower on a 64 x 4096 block, torch 2.13).
    lo, hi = source.amin(dim=2).float(), source.amax(dim=2).float()
    if clip_search_steps:
        scale, zero_point = _search_clipping(source.float(), lo, hi, spec, clip_search_steps)
    else:
        scale, zero_point = choose_qparams(lo, hi, spec)
    q = torch.div(source, scale.unsqueeze(2), out=work) if work is not None else torch.div(source, scale.unsqueeze(2))
    q = q.round_()
    if out is not None and spec.bits == 4:
        # |round(x / s)| <= 16 with min/max ranges, <= 23 when the clip search shrinks them to
        # 70%: far inside int8, so the zero point is added and the grid clamped on 1-byte
        # integers (the same integers: all are exact) instead of two fp32 passes.
        signed = out.view(torch.int8)
        signed.copy_(q)
        signed.add_(zero_point.unsqueeze(2).to(torch.int8)).clamp_(spec.qmin, spec.qmax)
        return out, scale, zero_point
    if not (spec.symmetric and spec.bits == 8):  # symmetric int8: |round(x / (amax / 127))| <= 127
        q = q.add_(zero_point.unsqueeze(2)).clamp_(spec.qmin, spec.qmax)
    if out is not None:
        return out.copy_(q), scale, zero_point
    return q.to(spec.storage_dtype), scale, zero_point


_COMPILED_BLOCK: list = []  # [compiled function] once built; [None] when compiling is not possible


def _block_kernel(device: torch.device, clip_search_steps: int = 0):
    """The block function for ``device``: on CUDA, ``torch.compile`` of :func:`_quantize_block`
    (one fused read of the weight and one write, about 10x eager on an H100); elsewhere, or if
    compiling fails, eager ops."""
    if device.type != "cuda":
        return _quantize_block
    if not _COMPILED_BLOCK:
        try:
            _COMPILED_BLOCK.append(torch.compile(_quantize_block, dynamic=True))
        except Exception:  # no compiler backend in this install: eager is correct, just slower
            _COMPILED_BLOCK.append(None)
    compiled = _COMPILED_BLOCK[0]
    if compiled is None:
        return _quantize_block

    def run(source, spec, steps):
        try:
            return compiled(source, spec, steps)
        except Exception:  # e.g. Triton missing at run time: fall back for good
            _COMPILED_BLOCK[0] = None
            return _quantize_block(source, spec, steps)

    return run


def _broadcast_qparam(qparam: torch.Tensor, qt_shape: torch.Size, granularity: Granularity):
    if isinstance(granularity, PerTensor):
        return qparam
    if isinstance(granularity, PerChannel):
        shape = [1] * len(qt_shape)
        shape[granularity.axis] = -1
        return qparam.reshape(shape)  # [out] or an algorithm's [out, 1]
    return qparam.unsqueeze(-1)  # per group: [rows, groups, 1] against [rows, groups, group]


def dequantize_weight(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real-valued tensor a :class:`QuantizedTensor` stands for, in ``dtype``: any
    granularity, a partial last group, integer or float zero points (HQQ's).

    Example:
        >>> qt = quantize_weight(torch.randn(4, 320), INT4_ASYMMETRIC, PerGroup(128))
        >>> dequantize_weight(qt).shape
        torch.Size([4, 320])
    """
    q = qt.unpacked()
    shape = q.shape
    if isinstance(qt.granularity, PerGroup):
        rows, cols = q.shape
        group = qt.granularity.group_size
        if cols % group and cols > group:  # partial last group: per-element qparams
            zp = None if qt.zero_point is None else expand_groups(qt.zero_point, group, cols)
            return dequantize(q, expand_groups(qt.scale, group, cols), zp, dtype)
        group = min(group, cols)  # a weight narrower than one group is one group
        q = q.reshape(rows, cols // group, group)
    scale = _broadcast_qparam(qt.scale, q.shape, qt.granularity)
    zp = None
    if qt.zero_point is not None:
        zp = _broadcast_qparam(qt.zero_point, q.shape, qt.granularity)
    return dequantize(q, scale, zp, dtype).reshape(shape)


# The algorithms' name for it (GPTQ / HQQ results are dequantized the same way).
dequantize_groups = dequantize_weight


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values (uint8 in 0..15) two per byte along the last axis.

    Element ``2i`` goes in the low nibble of byte ``i``, ``2i+1`` in the high nibble.
    Shape ``[..., K]`` -> ``[..., K // 2]`` (K must be even).

    Example:
        >>> pack_int4(torch.tensor([1, 2], dtype=torch.uint8))
        tensor([33], dtype=torch.uint8)
    """
    if q.shape[-1] % 2:
        raise InputError(
            f"int4 packing needs an even last dimension, got shape {tuple(q.shape)}",
            suggestion="Pad the tensor, or quantize this layer to int8.",
        )
    q = q.to(torch.uint8).contiguous()
    out = torch.empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8, device=q.device)
    _pack_int4_into(q, out)
    return out


def _pack_int4_into(q: torch.Tensor, out: torch.Tensor, words: torch.Tensor | None = None) -> None:
    """:func:`pack_int4` of contiguous uint8 ``q`` written into ``out``; ``words``: an int16
    buffer of ``out``'s shape to work in (allocated when None)."""
    if sys.byteorder != "little" or q.storage_offset() % 2:
        torch.bitwise_or(q[..., 0::2], q[..., 1::2] << 4, out=out)
        return
    # Each pair of bytes read as one little-endian int16 is ``even + 256 * odd``; OR-ing in
    # its value shifted right by 4 puts ``odd`` in bits 4..7, and the low byte is the packed
    # byte. Passes over int16 words instead of strided byte gathers: 3x faster on the CPU.
    pairs = q.view(torch.int16)
    words = torch.bitwise_right_shift(pairs, 4, out=words)
    words |= pairs
    out.copy_(words.bitwise_and_(0xFF))  # the mask: a defined cast on any CPU


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., K // 2]`` uint8 -> ``[..., K]`` values 0..15."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``.

    ``inf`` when the two are identical.
    """
    ref = reference.detach().double()
    noise = (ref - approximation.detach().to(ref.device).double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
