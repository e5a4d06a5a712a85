"""HQQ: data-free, half-quadratic refinement of the qparams of a round-to-nearest grid.

After Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023),
reference ``optimize_weights_proximal`` in mobiusml/hqq (``hqq/core/optimize.py``; dropbox/hqq
upstream). The scale of every group stays at its min/max (or clip-searched) value; the zero
point is refined by alternating

    W_q = clamp(round(W / s + z), qmin, qmax)          the grid, given z
    W_e = shrink_lp(W - (W_q - z) * s, beta)           a sparse outlier term (lp norm, p < 1)
    z   = mean(W_q - (W - W_e) / s)  over the group    closed-form zero point given W_e
    beta *= kappa

so the few weights the grid cannot reach are treated as outliers instead of dragging the
zero point toward them. ``beta *= kappa`` happens every step (upstream once forgot it in one
code path, which froze the shrinkage). The zero point comes out as a float (that is where
the gain is): the stored q are still integers 0..15 but ``q = clamp(round(x / s + z))`` (not
``round(x / s) + z``), and kernels that take ``scales_and_zeros`` accept it as is
(``zero = (8 - z) * s`` for the bias form).

Symmetric grids keep their fixed zero point (0 or 8); for them the same iteration refines the
scale instead: ``s = <W - W_e, W_q - z> / <W_q - z, W_q - z>`` (the least-squares scale given
the outlier term), an extension of ours, not upstream's.

``refine_scale=True`` (ours) refits scale and zero point together each step, as the least-
squares line ``W - W_e ~ s * (q - z)`` through the group's points. Measured on MiniLM int4
g128 (embedding cosine vs fp32, bench/accuracy_algorithms.py): RTN min/max 0.9619, RTN + clip
search 0.9648, upstream HQQ from min/max 0.9610 (lower weight MSE, lower cosine), from the clip
search 0.9662, with ``refine_scale`` from the clip search 0.9676 (g64: 0.9747 vs RTN 0.9719).

``column_weights`` (ours) weights each input column's error by its importance, e.g. the mean
square of the layer's inputs (the diagonal of its Hessian), and ``range_search_steps`` starts
from the best of a grid of shrunk (min, max) ranges by that weighted error, each scored at the
least-squares line through its codes (one refinement step, in closed form), so a 5 x 5 grid
(``range_search_steps=7``) does what a 7 x 7 grid scored as is did. The importance need not
come from data: on random token ids (``smoothing.synthetic_token_batches``) it measured, at
int4 g128, MiniLM 0.9772-0.9777 (unweighted best 0.9676; the spread is what equally good grids
give) and SmolLM2 perplexity 15.6 where RTN min/max gives 17.30 and fp32 13.64 (45% of the gap
closed; upstream HQQ: 17.52, -6%).

Unlike upstream, each group keeps its best iterate (by squared error, the quantity the model
output cares about) instead of the last one, and the loop stops early once an iteration lowers
the block's total error by less than 0.1% (upstream: once it stops falling; the iterations
after that gained ~0.05% of error for 3x the time).

Implementation: every step needs only three per-group sums of the codes (``w q``, ``w q^2``,
``w q (x - mean)``); the fits and the squared errors are closed forms in them, and the outlier
term enters them through the residuals above the shrink's threshold, found without a pass when
no group can reach it (the usual case at trained-weight scale: |residual| <= s / 2 inside the
grid). Measured on this project's CPU (1 thread, 4096 x 4096 fp32, the call above): 0.8 s vs
3.5 s before at trained-weight scale (``randn * 0.02``); 1.0 s vs 2.3 s on ``randn``, where 2-3%
of the residuals are outliers and the search (25 candidates x 9 passes) is most of the time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mono_quant.core.schemes import PerChannel, PerGroup, QuantizedTensor, QuantSpec, group_bounds, rtn_quantize_weight
from mono_quant.errors import ConfigurationError, InputError

__all__ = ["hqq_quantize_weight", "HQQ_DEFAULT_ITERATIONS"]

HQQ_DEFAULT_ITERATIONS = 20
# Elements of one row block. Every block reuses the same few fp32 buffers (fresh pages would
# fault in on each allocation), so a 4096 x 4096 weight runs in 128-row blocks with the same
# small footprint (~30 MiB with the range search) as a tiny one.
_BLOCK_ELEMENTS = 1 << 19
_MIN_SCALE = 1e-12
# The range search shrinks each end of a group's range by at most this fraction ...
_MAX_SHRINK = 0.3
# ... and evaluates its candidates on row chunks of this many candidate elements (best of
# 2^17..2^21 on this project's CPU: smaller chunks pay per-op overhead, larger ones miss cache).
_SEARCH_ELEMENTS = 1 << 20
# The loop stops early once an iteration lowers the block's total error by less than this fraction.
_CONVERGED = 1e-3


def _search_levels(steps: int) -> int:
    """Shrink factors per end the range search scores for ``range_search_steps=steps``: a
    candidate scored at its fitted qparams covers its neighbours, so ``(steps + 3) // 2``
    levels (5 for 7) match the accuracy of the ``steps x steps`` plain grid it replaced."""
    return (steps + 3) // 2


def _shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """Generalised soft threshold: ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (p = 1: plain
    soft threshold). ``|0|^(p-1) = inf`` gives relu(-inf) = 0: exact zeros stay zeros."""
    magnitude = x.abs()
    if lp_norm == 1:
        threshold = torch.full_like(magnitude, 1.0 / beta)
    else:
        threshold = magnitude.pow(lp_norm - 1).div_(beta)
    return magnitude.sub_(threshold).clamp_(min=0.0).mul_(torch.sign(x))


class _Tile(NamedTuple):
    """A tile ``x [n, G, g]`` with what every fit and error needs, per group ``[., G, 1]``:
    the column weights ``w [1, G, g]`` (None: all 1), their sum ``total``, the weighted mean
    ``mean`` of ``x``, ``centred = w * (x - mean)`` and ``energy = sum w (x - mean)^2``.
    Centring keeps the closed forms below free of cancellation; group sums accumulate in
    ``dtype`` (float32; float64 for int8, whose errors are ~1e-4 of the weight's energy)."""

    x: torch.Tensor
    weights: torch.Tensor | None
    total: torch.Tensor
    mean: torch.Tensor
    centred: torch.Tensor
    energy: torch.Tensor
    dtype: torch.dtype


def _group_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum over the last dim, accumulated in ``dtype``, as float64: the closed forms that use
    it cancel (the error of a good fit can be ~1e-6 of the group's energy)."""
    return x.sum(dim=-1, keepdim=True, dtype=dtype).double()


def _make_tile(
    x: torch.Tensor, weights: torch.Tensor | None, centred: torch.Tensor, work: torch.Tensor, dtype
) -> _Tile:
    if weights is None:
        total = torch.full((1, 1, 1), x.shape[-1], dtype=torch.float64, device=x.device)
        mean = _group_sum(x, dtype) / total
    else:
        total = _group_sum(weights, dtype)
        mean = _group_sum(torch.mul(x, weights, out=work), dtype) / total
    mean = mean.float()  # the mean centred on, exactly
    torch.sub(x, mean, out=centred)
    torch.mul(centred, centred, out=work)
    energy = _group_sum(work if weights is None else work.mul_(weights), dtype)
    if weights is not None:
        centred.mul_(weights)
    return _Tile(x, weights, total, mean.double(), centred, energy, dtype)


def _code_sums(tile: _Tile, codes: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum w q, sum w q^2, sum w q (x - mean))`` per group of ``codes [n, G, g]``."""
    if tile.weights is None:
        sum_q = _group_sum(codes, tile.dtype)
        sum_qq = _group_sum(torch.mul(codes, codes, out=work), tile.dtype)
    else:
        sum_q = _group_sum(torch.mul(codes, tile.weights, out=work), tile.dtype)
        sum_qq = _group_sum(work.mul_(codes), tile.dtype)
    return sum_q, sum_qq, _group_sum(torch.mul(codes, tile.centred, out=work), tile.dtype)


def _range_search(
    tile: _Tile, spec: QuantSpec, steps: int, codes: torch.Tensor, work: torch.Tensor, shifted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric ``(scale, zero) [n, G, 1]`` float32 for ``tile``: the codes of each of
    ``steps x steps`` (min, max) ranges, each end shrunk by one of ``steps`` factors in
    ``[0, _MAX_SHRINK]``, scored at their weighted least-squares line ``x ~ s * (q - z)`` (the
    first refinement step, in closed form); the lowest (weighted) squared error wins. Float
    zero points.

    Every candidate is evaluated at once on row chunks of ~``_SEARCH_ELEMENTS`` candidate
    elements: ``codes`` and ``work`` are flat buffers of at least that size (and at least
    ``steps^2 * G * g``), ``shifted`` one of at least ``1 / steps`` of it.
    """
    x = tile.x
    n, groups, width = x.shape
    count = steps * steps
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    levels = spec.qmax - spec.qmin
    keep = 1 - torch.linspace(0, _MAX_SHRINK, steps, device=x.device)
    lows = low.unsqueeze(1) * keep.view(1, steps, 1, 1)  # [n, steps, G, 1]
    highs = high.unsqueeze(1) * keep.view(1, steps, 1, 1)
    # 1 / scale of each (low, high) pair, low-major: [n, steps, steps, G, 1]
    inverse = (highs.unsqueeze(1) - lows.unsqueeze(2)).clamp_(min=levels * _MIN_SCALE).reciprocal_().mul_(levels)
    weights = None if tile.weights is None else tile.weights.unsqueeze(1)
    sums = torch.empty((3, n, count, groups, 1), dtype=tile.dtype, device=x.device)
    chunk = max(1, _SEARCH_ELEMENTS // (count * groups * width))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        # x above each low end, [rows, steps, 1, G, g]; below it: code 0 whatever the scale
        above = shifted[: rows * steps * groups * width].view(rows, steps, groups, width)
        above = torch.sub(x[start:stop].unsqueeze(1), lows[start:stop], out=above).clamp_(min=0).unsqueeze(2)
        q = codes[: rows * count * groups * width].view(rows, steps, steps, groups, width)
        torch.mul(above, inverse[start:stop], out=q).round_().clamp_(max=levels)  # codes 0..levels
        q = q.view(rows, count, groups, width)
        sum_q, sum_qq, covariance = (part[start:stop] for part in sums)
        if weights is None:
            torch.sum(q, dim=-1, keepdim=True, dtype=tile.dtype, out=sum_q)
            product = torch.mul(q, q, out=work[: q.numel()].view(q.shape))
        else:
            product = torch.mul(q, weights, out=work[: q.numel()].view(q.shape))
            torch.sum(product, dim=-1, keepdim=True, dtype=tile.dtype, out=sum_q)
            product.mul_(q)
        torch.sum(product, dim=-1, keepdim=True, dtype=tile.dtype, out=sum_qq)
        torch.sum(q.mul_(tile.centred[start:stop].unsqueeze(1)), dim=-1, keepdim=True, dtype=tile.dtype, out=covariance)
    sum_q, sum_qq, covariance = sums.double()
    q_mean = sum_q / tile.total.unsqueeze(1)
    fitted = covariance / (sum_qq - sum_q * q_mean)  # nan where all codes are equal
    error = torch.where(fitted > _MIN_SCALE, tile.energy.unsqueeze(1) - covariance * fitted, float("inf"))
    best_error, index = error.min(dim=1)
    scale, q_mean = fitted.gather(1, index.unsqueeze(1)).squeeze(1), q_mean.gather(1, index.unsqueeze(1)).squeeze(1)
    zero = q_mean - tile.mean / scale
    # the min/max grid for a group none of whose candidates has two distinct codes
    usable = torch.isfinite(best_error)
    fallback = ((high - low) / levels).clamp_(min=_MIN_SCALE).double()
    scale = torch.where(usable, scale, fallback)
    zero = torch.where(usable, zero, -low.double() / fallback)
    return scale.float(), (zero + spec.qmin).float()


def _outlier_sums(
    tile: _Tile,
    codes: torch.Tensor,
    position: torch.Tensor,
    scale: torch.Tensor,
    flagged: torch.Tensor,
    beta: float,
    lp_norm: float,
    threshold: float,
    work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum w e, sum w q e)`` per group ``[n, G, 1]`` of HQQ's outlier term ``e =
    shrink_lp(r)``, ``r = x - (q - z) * s = (position - q) * s`` with ``position = x / s + z``;
    ``e`` is zero wherever ``|r| <= threshold``.

    Only the ``flagged [n, G, 1]`` groups can hold such residuals; they are gathered (or, when
    most are flagged, the whole tile is scanned) and the shrink is evaluated at the residuals
    above the threshold only.
    """
    n, groups, width = codes.shape
    flat_flags = flagged.view(-1)
    if 2 * int(flat_flags.sum()) > flat_flags.numel():
        distance = torch.sub(position, codes, out=work).abs_()
        hits = (distance > threshold / scale).view(-1).nonzero().squeeze(1)
    else:
        ids = flat_flags.nonzero().squeeze(1)
        distance = position.view(-1, width).index_select(0, ids).sub_(codes.view(-1, width).index_select(0, ids))
        local = (distance.abs_() > threshold / scale.view(-1, 1)[ids]).view(-1).nonzero().squeeze(1)
        hits = ids[local // width] * width + local % width
    group = hits // width
    codes_at = codes.view(-1).take(hits)
    outliers = _shrink_lp((position.view(-1).take(hits) - codes_at) * scale.view(-1).take(group), beta, lp_norm)
    if tile.weights is not None:
        outliers = outliers.mul_(tile.weights.reshape(-1).take(hits % (groups * width)))
    outliers = outliers.double()
    sum_e = torch.zeros(n * groups, dtype=torch.float64, device=codes.device)
    sum_qe = torch.zeros_like(sum_e).index_add_(0, group, outliers * codes_at.double())
    return sum_e.index_add_(0, group, outliers).view(n, groups, 1), sum_qe.view(n, groups, 1)


def _refine_tile(
    tile: _Tile,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    iterations: int,
    lp_norm: float,
    beta: float,
    kappa: float,
    early_stop: bool,
    refine_scale: bool,
    codes: torch.Tensor,
    work: torch.Tensor,
    position: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ on ``tile`` from ``scale, zero [n, G, 1]`` -> ``(q, scale, zero)``: ``q`` float
    integers in ``codes [n, G, g]``; ``scale``/``zero`` ``[n, G, 1]`` float32. ``work`` and
    ``position`` are scratch of the tile's shape.

    Each step needs only per-group sums of the codes (``_code_sums``): the outlier term enters
    them through the few residuals above the shrink's threshold (``_outlier_sums``), and the
    fits and squared errors are closed forms in those sums.
    """
    x, total = tile.x, tile.total
    # the starting qparams may be column slices of the block's (strided): the outlier sums index them flat
    scale, zero = scale.contiguous(), zero.contiguous()
    qmin, qmax = spec.qmin, spec.qmax
    refine_zero = not spec.symmetric
    x_low, x_high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)

    def grid(s, z):  # codes = clamp(round(x / s + z)); position = x / s + z
        torch.div(x, s, out=position)
        if refine_zero:
            torch.round(position.add_(z), out=codes)
        else:  # integer z: round(x / s) + z == round(x / s + z)
            torch.round(position, out=codes).add_(z)
            position.add_(z)
        return codes.clamp_(qmin, qmax)

    def squared_error(s, z, sums):  # sum w (s (q - z) - x)^2 per group, around the means
        sum_q, sum_qq, covariance = sums
        s, z, q_mean = s.double(), z.double(), sum_q / total
        offset = s * (q_mean - z) - tile.mean
        return s * s * (sum_qq - sum_q * q_mean) - 2 * s * covariance + total * offset * offset + tile.energy

    best_scale, best_zero = scale, zero
    sums = _code_sums(tile, grid(scale, zero), work)
    best_error = squared_error(scale, zero, sums)
    best_total = float(best_error.sum())
    for _ in range(iterations):
        sum_q, sum_qq, covariance = sums
        # target = x - e (e: the outliers) is what the grid should reproduce: its mean, and its
        # covariance with the codes
        q_mean, t_mean = sum_q / total, tile.mean
        # |x - (q - z) s| <= s / 2 inside the grid; beyond its ends it is the distance to the end
        threshold = beta ** (-1.0 / (2.0 - lp_norm))  # shrink_lp(r) != 0 iff |r| > threshold
        reach = torch.maximum(scale / 2, torch.maximum(x_high - scale * (qmax - zero), scale * (qmin - zero) - x_low))
        flagged = reach > threshold * (1 - 1e-4)
        if bool(flagged.any()):
            sum_e, sum_qe = _outlier_sums(
                tile, codes, position, scale, flagged, beta, lp_norm, threshold * (1 - 1e-4), work
            )
            t_mean = t_mean - sum_e / total
            covariance = covariance - sum_qe + sum_q * (sum_e / total)
        if refine_zero and refine_scale:  # least-squares line target ~ s * (q - z): scale and zero together
            fitted = (covariance / (sum_qq - sum_q * q_mean)).float()
            scale = torch.where(torch.isfinite(fitted) & (fitted > _MIN_SCALE), fitted, scale)
            zero = (q_mean - t_mean / scale.double()).float()
        elif refine_zero:  # upstream: the closed-form zero point for the fixed scale
            zero = (q_mean - t_mean / scale.double()).float()
        else:  # least-squares scale for the fixed zero point: <target, q - z> / <q - z, q - z>
            z = zero.double()
            fitted = (covariance + (q_mean - z) * t_mean * total) / (sum_qq - 2 * z * sum_q + z * z * total)
            scale = torch.where(torch.isfinite(fitted), fitted.float(), best_scale).clamp_(min=_MIN_SCALE)
        beta *= kappa
        sums = _code_sums(tile, grid(scale, zero), work)
        error = squared_error(scale, zero, sums)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        total_error = float(error.sum())
        if early_stop and total_error >= best_total * (1 - _CONVERGED):
            break
        best_total = min(best_total, total_error)
    return grid(best_scale, best_zero), best_scale, best_zero


def hqq_quantize_weight(
    weight: torch.Tensor,
    spec: QuantSpec,
    group_size: int | None = 128,
    iterations: int = HQQ_DEFAULT_ITERATIONS,
    *,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
    init_clip_search_steps: int = 0,
    refine_scale: bool = False,
    column_weights: torch.Tensor | None = None,
    range_search_steps: int = 0,
) -> QuantizedTensor:
    """Quantize ``weight [N, K]`` with HQQ-refined qparams; data-free.

    ``group_size=None`` is per channel (one group per row). The starting qparams are min/max
    (``init_clip_search_steps=0``, upstream's) or the MSE clip search's; ``refine_scale``
    refits the scale with the zero point (see the module docstring for measurements).
    ``column_weights [K]`` (positive, e.g. the mean square of each input feature on some
    inputs: the diagonal of the layer's Hessian) weights each column's error in every fit and
    comparison, so the grid serves the inputs that matter. ``range_search_steps`` (asymmetric
    grids): start from the best of a grid of shrunk (min, max) pairs by that weighted error
    instead of the plain min/max (or clip-searched) range; each pair is scored at the
    least-squares qparams of its codes, so ``(steps + 3) // 2`` shrink factors per end (a
    5 x 5 grid for 7) do what ``steps x steps`` pairs scored as they are did. Rows are
    processed in blocks of ~0.5M elements, so the extra memory is a few tens of MiB whatever
    the weight. ``early_stop`` ends the loop once an iteration lowers the block's total error
    by less than 0.1%.

    Returns a :class:`QuantizedTensor`: ``qdata [N, K]`` (uint8 0..15 / int8), ``scale``
    ``[N, ceil(K / g)]`` (``[N]`` per channel) float32 and, for asymmetric grids, a **float32**
    ``zero_point`` of the same shape (dequantize as ``(q - zero_point) * scale``; quantize as
    ``clamp(round(x / scale + zero_point))``). Symmetric grids keep their integer zero point
    (int4: 8; int8: None) and get refined scales instead.

    Example:
        >>> from mono_quant.core.schemes import INT4_ASYMMETRIC
        >>> qt = hqq_quantize_weight(torch.randn(8, 192), INT4_ASYMMETRIC, group_size=64)
        >>> qt.scale.shape, qt.zero_point.dtype
        (torch.Size([8, 3]), torch.float32)
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(
            f"HQQ needs a 2-D floating-point weight, got shape {tuple(weight.shape)} dtype {weight.dtype}",
            suggestion="Reshape convolution weights to [out, in * kh * kw], or use round-to-nearest for this layer.",
        )
    if iterations < 0 or not (0 < lp_norm <= 1) or beta <= 0 or kappa < 1:
        raise ConfigurationError(
            f"invalid HQQ settings iterations={iterations!r} lp_norm={lp_norm!r} beta={beta!r} kappa={kappa!r}",
            suggestion="Use iterations >= 0, 0 < lp_norm <= 1, beta > 0 and kappa >= 1 (defaults 20, 0.7, 10, 1.01).",
        )
    if group_size is not None:
        PerGroup(group_size)  # validates the group size
    rows, columns = weight.shape
    if column_weights is not None:
        column_weights = column_weights.detach().to(device=weight.device, dtype=torch.float32).reshape(-1)
        if column_weights.numel() != columns or not bool(torch.isfinite(column_weights).all()):
            raise InputError(
                f"HQQ column_weights must be {columns} finite values, got shape {tuple(column_weights.shape)}",
                suggestion="Pass one importance per input feature, e.g. the mean square of each input.",
            )
        # relative to the mean, with a floor: a feature never seen still counts a little
        column_weights = column_weights / column_weights.mean().clamp(min=_MIN_SCALE)
        column_weights = column_weights.clamp(min=1e-3)
    bounds = group_bounds(columns, group_size)
    full = (columns // group_size) * group_size if group_size is not None and group_size < columns else 0
    keep_zero = not (spec.symmetric and spec.bits == 8)
    search = range_search_steps > 1 and not spec.symmetric
    levels = _search_levels(range_search_steps) if search else 1
    sum_dtype = torch.float64 if spec.bits == 8 else torch.float32
    device = weight.device
    q_out = torch.empty((rows, columns), dtype=spec.storage_dtype, device=device)
    scale_out = torch.empty((rows, len(bounds)), dtype=torch.float32, device=device)
    zero_dtype = torch.int32 if spec.symmetric else torch.float32
    zero_out = torch.empty((rows, len(bounds)), dtype=zero_dtype, device=device) if keep_zero else None
    block = max(1, _BLOCK_ELEMENTS // max(columns, 1))
    # One set of buffers for every block and piece (views of their first elements); the range
    # search evaluates all its candidates at once in the first two, for a chunk of rows.
    elements = min(block, rows) * columns
    candidates = max(elements, _SEARCH_ELEMENTS + levels**2 * columns) if search else elements
    sizes = {"codes": candidates, "work": candidates, "x": elements, "centred": elements}
    sizes["shifted"] = max(elements, candidates // levels)
    buffers = {name: torch.empty(size, dtype=torch.float32, device=device) for name, size in sizes.items()}
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        n = stop - start
        rows_block = weight[start:stop].detach().float()
        init_scale = init_zero = None
        if not search:
            init = rtn_quantize_weight(rows_block, spec, group_size, init_clip_search_steps)
            init_scale = init.scale.view(n, -1).float()
            init_zero = torch.zeros_like(init_scale) if init.zero_point is None else init.zero_point.view(n, -1).float()
        # Whole groups as one [n, G, g] tile, the partial tail (if any) as a [n, 1, r] tile.
        pieces = [(0, full or columns, 0)] if full or len(bounds) == 1 else []
        if full and full < columns:
            pieces.append((full, columns, len(bounds) - 1))
        for first, last, first_group in pieces:
            width = bounds[first_group][1] - bounds[first_group][0]
            groups = (last - first) // width
            shape = (n, groups, width)

            def view(name: str, shape: tuple[int, ...] = shape) -> torch.Tensor:
                return buffers[name][: math.prod(shape)].view(shape)

            source = rows_block[:, first:last]
            x = source.view(shape) if source.is_contiguous() else view("x").copy_(source.reshape(shape))
            tile_weights = None
            if column_weights is not None:
                tile_weights = column_weights[first:last].reshape(1, groups, width)
            tile = _make_tile(x, tile_weights, view("centred"), view("work"), sum_dtype)
            group_slice = slice(first_group, first_group + groups)
            if search:
                tile_scale, tile_zero = _range_search(
                    tile, spec, levels, buffers["codes"], buffers["work"], buffers["shifted"]
                )
            else:
                tile_scale = init_scale[:, group_slice].unsqueeze(-1)
                tile_zero = init_zero[:, group_slice].unsqueeze(-1)
            q, scale, zero = _refine_tile(
                tile,
                tile_scale,
                tile_zero,
                spec,
                iterations,
                lp_norm,
                beta,
                kappa,
                early_stop,
                refine_scale,
                view("codes"),
                view("work"),
                view("shifted"),
            )
            q_out[start:stop, first:last] = q.view(n, last - first)
            scale_out[start:stop, group_slice] = scale.squeeze(-1)
            if zero_out is not None:
                zero_out[start:stop, group_slice] = zero.squeeze(-1)
    if group_size is None:
        return QuantizedTensor(
            q_out, scale_out.view(rows), zero_out.view(rows) if zero_out is not None else None, spec, PerChannel()
        )
    return QuantizedTensor(q_out, scale_out, zero_out, spec, PerGroup(group_size))
