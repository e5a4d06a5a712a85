"""GPTQ: quantize a Linear's weight column by column, pushing each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

After Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022), reference ``gptq.py`` in IST-DASLab/gptq (``add_batch``,
``fasterquant``); GPTQModel and llm-compressor's ``GPTQModifier`` follow the same scheme.
What we keep from the reference, and where we differ:

* ``H = 2/T * sum_t x_t x_t^T`` over the T calibration tokens, accumulated in fp32 as a running
  average (``add_batch``); dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``.
* Dampening ``damp * mean(diag H)`` (1%); where the Cholesky factorisation fails we retry
  with 10x more (twice), then with the diagonal floored at its mean, and only then fall back
  to round-to-nearest for that layer with a :class:`GPTQFallbackWarning` (the reference just
  raises).
* Lazy block updates over 128 columns (``fasterquant``): inside a block the error of each
  column updates the rest of the block; the rest of the matrix gets one matmul per block.
* Act-order (``desc_act``, on by default): columns are processed in descending order of the
  Hessian diagonal. With static groups: the groups stay the original column ranges and a
  group's qparams are chosen once, when the quantizer reaches the first of its columns, from
  the *current* (already error-updated) weights of the whole group, the lazy updates still
  pending for its later columns included, with the MSE clip search (the reference uses
  min/max). So there is no ``g_idx``, and stored layouts and kernels are those of plain RTN.
  The last group may be partial (``K % group_size``).
* Dampening grows with features / tokens (``sample_damp``): with ~1k calibration tokens for
  1536 input features the sample Hessian is rank-deficient and its small eigenvalues noise.
* True-sequential (optional, ``true_sequential``): inside a block, the Linears sharing an
  input are quantized in forward order, each calibrated with the ones before it quantized.
* Our working copy is the transposed weight ``[K, N]``, so each column is a contiguous row.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mono_quant.core.calibration import run_batch
from mono_quant.core.options import GPTQ_CLIP_SEARCH_STEPS
from mono_quant.core.schemes import (
    PerChannel,
    PerGroup,
    QuantizedTensor,
    QuantSpec,
    dequantize_groups,
    group_bounds,
    rtn_quantize_weight,
)
from mono_quant.errors import ConfigurationError, InputError, QuantizationError

__all__ = [
    "GPTQFallbackWarning",
    "HessianAccumulator",
    "gptq_quantize_weight",
    "gptq_quantize_model",
    "GPTQ_DEFAULT_MIN_TOKENS",
    "GPTQ_DEFAULT_ACT_ORDER",
    "GPTQ_DEFAULT_TRUE_SEQUENTIAL",
    "GPTQ_DEFAULT_SAMPLE_DAMP",
]

# Below this many calibration tokens a layer's Hessian says too little (rank <= tokens): RTN.
GPTQ_DEFAULT_MIN_TOKENS = 32
# Measured (bench/accuracy_algorithms.py; calibration and evaluation on different text), int4 g128:
# act-order: SmolLM2 perplexity gap to fp32 closed 37% -> 68% (8 x 512 eval tokens), MiniLM
# embedding cosine 0.9827 -> 0.9840; dampening 10% x features / tokens (at least 1%): MiniLM
# (~1k calibration tokens for up to 1536 features) 0.9840 -> 0.9865; SmolLM2 (8k tokens, so ~1-2%)
# 64% with both (68% / 59% / 61% at 1% / 3% / 10% flat: within the noise of 8 windows).
# True-sequential changed MiniLM by +-0.0002: off (it costs one pass of each block per set).
GPTQ_DEFAULT_ACT_ORDER = True
GPTQ_DEFAULT_TRUE_SEQUENTIAL = False
GPTQ_DEFAULT_SAMPLE_DAMP = 0.1
_DAMP_RETRIES = 2  # 1% -> 10% -> 100% of the mean diagonal before the diagonal floor


class GPTQFallbackWarning(UserWarning):
    """GPTQ could not run on a layer (no usable Hessian) and used round-to-nearest instead."""


class HessianAccumulator:
    """Running ``H = 2/T * sum x x^T`` of a Linear's inputs, fp32, ``[K, K]``.

    Feed it input activations ``[..., K]`` (every leading axis counts as tokens), e.g. from a
    forward pre-hook: ``module.register_forward_pre_hook(acc.pre_hook)``.

    Example:
        >>> acc = HessianAccumulator(4)
        >>> acc.add(torch.ones(3, 4)); acc.tokens
        3
        >>> float(acc.hessian[0, 0])
        2.0
    """

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        self.columns = columns
        self.hessian = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x [..., K]``."""
        if x.shape[-1] != self.columns:
            raise InputError(
                f"HessianAccumulator for {self.columns} input features got activations of shape {tuple(x.shape)}",
                suggestion="Attach one accumulator per Linear, sized to its in_features.",
            )
        rows = x.detach().reshape(-1, self.columns)
        count = rows.shape[0]
        if count == 0:
            return
        if self.hessian.device != rows.device:
            self.hessian = self.hessian.to(rows.device)
        # Running average as in the reference's add_batch: the sum stays O(1) whatever T is.
        self.hessian.mul_(self.tokens / (self.tokens + count))
        self.tokens += count
        scaled = rows.float().mul(math.sqrt(2.0 / self.tokens))
        self.hessian.addmm_(scaled.t(), scaled)

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook form of :meth:`add` (first positional input)."""
        self.add(args[0])


def _warn_fallback(name: str | None, reason: str) -> None:
    label = f"layer {name!r}" if name else "a layer"
    warnings.warn(f"GPTQ fell back to round-to-nearest for {label}: {reason}", GPTQFallbackWarning, stacklevel=3)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, str]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag) * I)^-1`` (``U^T U = H^-1``), or
    ``(None, why)`` when every dampening level fails."""
    if not bool(torch.isfinite(hessian).all()):
        return None, "the Hessian has non-finite values (inf/NaN activations)"
    mean_diag = float(hessian.diagonal().mean())
    if not mean_diag > 0:
        return None, "the Hessian is zero (all calibration inputs were zero)"
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)

    def attempts():
        for k in range(_DAMP_RETRIES + 1):
            yield hessian + (damp * 10**k * mean_diag) * eye
        floored = hessian.clone()
        floored.diagonal().clamp_(min=mean_diag)
        yield floored + (damp * mean_diag) * eye

    for damped in attempts():
        # The reference takes cholesky(cholesky_inverse(cholesky(H)), upper=True). The same factor
        # comes from one Cholesky and one triangular inverse with the index order reversed (J):
        # J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular.
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if int(info):
            continue
        upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        if bool(torch.isfinite(upper).all()):
            return upper, ""
    return None, "the Cholesky factorisation failed even with 100% dampening and a floored diagonal"


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The per-column loop is thousands of tiny ops: with a thread pool each one waits for every
    worker thread, and on a loaded machine (here: 2 cores, other jobs) a busy core stalls each
    op for a scheduler slice. Measured on SmolLM2's layers, 2 threads 0.05-5 s per Linear
    (erratic), 1 thread 0.06-0.45 s. The thread count is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _group_qparams(
    columns_t: torch.Tensor, spec: QuantSpec, clip_search_steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qparams ``[N]`` of one group from its current weights, transposed: ``columns_t [g, N]``."""
    qt = rtn_quantize_weight(columns_t.t(), spec, None, clip_search_steps)
    return qt.scale, qt.zero_point


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianAccumulator,
    spec: QuantSpec,
    group_size: int | None = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search_steps: int = GPTQ_CLIP_SEARCH_STEPS,
    min_tokens: int = GPTQ_DEFAULT_MIN_TOKENS,
    act_order: bool = GPTQ_DEFAULT_ACT_ORDER,
    sample_damp: float = GPTQ_DEFAULT_SAMPLE_DAMP,
    name: str | None = None,
) -> QuantizedTensor:
    """GPTQ-quantize ``weight [N, K]`` given the Hessian ``[K, K]`` of its inputs. Pure: the
    inputs are not modified.

    ``group_size=None``: per output channel (qparams from the whole row, before any update;
    int8's usual layout); else groups of ``group_size`` along K, the last one possibly partial.
    ``clip_search_steps``: MSE clip search for each group's qparams (0: min/max). Layers whose
    Hessian cannot be factorised, or whose accumulator saw fewer than ``min_tokens`` tokens, are
    quantized round-to-nearest (same qparams rule) with a :class:`GPTQFallbackWarning`.
    ``act_order``: columns in descending Hessian-diagonal order (static groups, same layout).
    ``sample_damp``: with an accumulator, dampening is at least ``sample_damp * K / tokens``
    of the mean diagonal (capped at 100%); ``damp`` is the floor.

    Returns a :class:`QuantizedTensor` with integer qdata ``[N, K]``, scale / zero point
    ``[N]`` (per channel) or ``[N, ceil(K / g)]``.

    Example:
        >>> from mono_quant.core.schemes import INT4_ASYMMETRIC
        >>> x = torch.randn(256, 64); acc = HessianAccumulator(64); acc.add(x)
        >>> qt = gptq_quantize_weight(torch.randn(8, 64), acc, INT4_ASYMMETRIC, group_size=32)
        >>> qt.scale.shape
        torch.Size([8, 2])
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(
            f"GPTQ needs a 2-D floating-point weight, got shape {tuple(weight.shape)} dtype {weight.dtype}",
            suggestion="Reshape convolution weights to [out, in * kh * kw], or use round-to-nearest for this layer.",
        )
    if not (0 <= damp < 1) or block_size < 1:
        raise ConfigurationError(
            f"invalid GPTQ settings damp={damp!r} block_size={block_size!r}",
            suggestion="Use 0 <= damp < 1 (default 0.01) and block_size >= 1 (default 128).",
        )
    if group_size is not None:
        PerGroup(group_size)  # validates the group size
    rows, columns = weight.shape
    tokens = None
    if isinstance(hessian, HessianAccumulator):
        tokens, hessian = hessian.tokens, hessian.hessian
    if tuple(hessian.shape) != (columns, columns):
        raise InputError(
            f"Hessian of shape {tuple(hessian.shape)} does not match a weight with {columns} input features",
            suggestion="Accumulate the Hessian from this layer's own inputs (HessianAccumulator(in_features)).",
        )
    if tokens is not None and tokens < min_tokens:
        _warn_fallback(name, f"it saw {tokens} calibration tokens (< {min_tokens})")
        return rtn_quantize_weight(weight.detach(), spec, group_size, clip_search_steps)

    device = weight.device
    work = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    if bool(dead.all()):
        _warn_fallback(name, "every input was zero on the calibration data")
        return rtn_quantize_weight(weight.detach(), spec, group_size, clip_search_steps)
    h.diagonal()[dead] = 1.0
    work[:, dead] = 0.0  # never seen non-zero: its weight cannot matter on this data

    bounds = group_bounds(columns, group_size)
    keep_zero = not (spec.symmetric and spec.bits == 8)
    scales = torch.empty((rows, len(bounds)), dtype=torch.float32, device=device)
    zeros = torch.empty((rows, len(bounds)), dtype=torch.int32, device=device) if keep_zero else None
    # Act-order: quantize the columns with the largest Hessian diagonal (the most active inputs)
    # first, while the most columns remain to absorb their error. Only the processing order is
    # permuted: every column keeps the qparams of its group in the original order ("static
    # groups"), so the result is stored exactly as without act-order (no g_idx).
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    group_of = torch.arange(columns, device=device) // (group_size or columns)
    if order is not None:
        h = h[order][:, order]
        work = work[:, order]
        group_of = group_of[order]
    if tokens and sample_damp:
        # Few tokens per input feature: the sample Hessian's small eigenvalues are mostly noise
        # (rank <= tokens), so shrink it harder, in proportion to features / tokens.
        damp = max(damp, min(sample_damp * columns / tokens, 1.0))
    upper, why = _inverse_hessian_factor(h, damp)
    if upper is None:
        _warn_fallback(name, why)
        return rtn_quantize_weight(weight.detach(), spec, group_size, clip_search_steps)
    group_list = group_of.tolist()
    members: dict[int, list[int]] = {}
    for position, group in enumerate(group_list):
        members.setdefault(group, []).append(position)
    if group_size is None:  # per channel: one set of qparams from the unmodified row
        scale, zero = _group_qparams(work.t(), spec, clip_search_steps)
        scales[:, 0] = scale
        if zeros is not None:
            zeros[:, 0] = zero
        step = block_size
    elif order is None:  # blocks hold whole groups: a group starts with every column up to date
        step = max(1, block_size // group_size) * group_size
    else:
        step = block_size
    # Rows of [G, N]: the qparams of a group, filled when the quantizer first reaches the group.
    scale_rows = scales.t().contiguous()
    zero_rows = zeros.t().float().contiguous() if zeros is not None else None
    offset_rows = zero_rows * scale_rows if zero_rows is not None else None
    ready = [group_size is None] * len(bounds)

    work_t = work.t().contiguous()  # [K, N]: a column is a contiguous row
    del work
    q_t = torch.empty((columns, rows), dtype=torch.float32, device=device)
    # The loop below runs once per column: it is bound by the number of tensor ops, so every
    # step writes in place into its destination (q_t, errors) and uses Python floats for 1/d.
    with _one_thread_on_cpu(device):
        for block_start in range(0, columns, step):
            block_stop = min(block_start + step, columns)
            block = work_t[block_start:block_stop].clone()  # [B, N]
            errors = torch.empty_like(block)
            hinv = upper[block_start:block_stop, block_start:block_stop]
            inverse_diagonal = hinv.diagonal().reciprocal().tolist()
            width = block_stop - block_start
            for i in range(width):
                column = block_start + i
                group = group_list[column]
                if not ready[group]:
                    current = _current_columns(members[group], block, work_t, upper, errors, block_start, i)
                    scale, zero = _group_qparams(current, spec, clip_search_steps)
                    scale_rows[group] = scale
                    if zero_rows is not None:
                        zero_rows[group] = zero.float()
                        offset_rows[group] = zero_rows[group] * scale
                    ready[group] = True
                col_scale = scale_rows[group]
                w = block[i]
                q = torch.div(w, col_scale, out=q_t[column])
                if zero_rows is not None:  # integer zero point: round(w / s) + z == round(w / s + z)
                    q.add_(zero_rows[group])
                q.round_().clamp_(spec.qmin, spec.qmax)
                error = torch.addcmul(w, q, col_scale, value=-1.0, out=errors[i])  # w - q s
                if offset_rows is not None:
                    error.add_(offset_rows[group])  # w - (q - z) s
                error.mul_(inverse_diagonal[i])
                if i + 1 < width:
                    block[i + 1 :].addr_(hinv[i, i + 1 :], error, alpha=-1.0)
            if block_stop < columns:  # the lazy update of everything after the block, one matmul
                work_t[block_stop:].addmm_(upper[block_start:block_stop, block_stop:].t(), errors, alpha=-1.0)

    if order is not None:  # back to the original column order
        q_t = q_t[torch.argsort(order)]
    qdata = q_t.t().contiguous().to(spec.storage_dtype)
    scales = scale_rows.t().contiguous()
    if zero_rows is not None:
        zeros = zero_rows.t().round().to(torch.int32).contiguous()
    if group_size is None:
        return QuantizedTensor(
            qdata,
            scales[:, 0].contiguous(),
            zeros[:, 0].contiguous() if zeros is not None else None,
            spec,
            PerChannel(),
        )
    return QuantizedTensor(qdata, scales, zeros, spec, PerGroup(group_size))


def _current_columns(
    positions: list[int],
    block: torch.Tensor,
    work_t: torch.Tensor,
    upper: torch.Tensor,
    errors: torch.Tensor,
    block_start: int,
    done: int,
) -> torch.Tensor:
    """The current (error-updated) values ``[len(positions), N]`` of not yet quantized columns at
    ``positions`` (processing order, all >= the column about to be quantized). Columns inside
    the block are up to date; those after it still miss the lazy update of the block's first
    ``done`` columns, added here."""
    block_stop = block_start + block.shape[0]
    inside = [p - block_start for p in positions if p < block_stop]
    after = [p for p in positions if p >= block_stop]
    parts = []
    if inside:
        parts.append(block[inside])
    if after:
        pending = work_t[after]
        if done:
            pending = pending - upper[block_start : block_start + done, after].t() @ errors[:done]
        parts.append(pending)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# -- the model-level driver --------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook: everything after the first layer of the stack is not needed."""


LayerSpecs = dict[str, tuple[QuantSpec, int | None]]


def _find_layer_stack(model: nn.Module, targets: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of repeated blocks holding the most target Linears (a decoder's
    ``model.layers``, BERT's ``encoder.layer``), or None."""
    targets = list(targets)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for target in targets if target.startswith(prefix))
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    return None if best is None else (best[1], best[2])


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _drop_cache(kwargs: dict) -> dict:
    """Layers re-run on stored inputs must not append to a KV cache captured with them."""
    cleaned = dict(kwargs)
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if key in cleaned:
            cleaned[key] = None
    if "use_cache" in cleaned:
        cleaned["use_cache"] = False
    return cleaned


class _SharedHessians:
    """Forward pre-hooks accumulating one Hessian per distinct input: Linears that read the very
    same tensor in a forward (q/k/v, gate/up) share their first reader's accumulator, and the
    shared inputs are accumulated once. Sharing is decided on the first batch."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.leader: dict[str, str] = {}
        self.accumulators: dict[str, HessianAccumulator] = {}
        # Inputs of the current batch, kept alive until it ends: a freed tensor's memory could be
        # reused by a later, different input at the same address.
        self._batch_inputs: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if name not in self.leader:
                earlier = self._batch_inputs.get(key)
                if earlier is not None:
                    self.leader[name] = earlier[1]
                    return
                self.leader[name] = name
                self.accumulators[name] = HessianAccumulator(x.shape[-1], x.device)
            if self.leader[name] != name:
                return
            self.accumulators[name].add(x)
            self._batch_inputs[key] = (x, name)

        return hook

    def end_batch(self) -> None:
        self._batch_inputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._batch_inputs.clear()

    def groups(self) -> list[tuple[list[str], HessianAccumulator]]:
        """``[(names, accumulator)]``; a Linear never called gets an empty accumulator."""
        members: dict[str, list[str]] = {}
        for name in self.linears:
            leader = self.leader.get(name)
            if leader is None:  # never ran: GPTQ falls back to RTN for it (0 tokens)
                self.accumulators[name] = HessianAccumulator(self.linears[name].in_features)
                leader = name
            members.setdefault(leader, []).append(name)
        return [(names, self.accumulators[leader]) for leader, names in members.items()]


def _quantize_group(
    names: list[str],
    linears: dict[str, nn.Linear],
    accumulator: HessianAccumulator,
    layer_specs: LayerSpecs,
    options: dict[str, Any],
) -> dict[str, QuantizedTensor]:
    """GPTQ of Linears sharing one Hessian; those with the same (spec, group size) are stacked
    along the rows into one call (rows are independent in GPTQ: same result, fewer loops)."""
    results: dict[str, QuantizedTensor] = {}
    by_spec: dict[tuple, list[str]] = {}
    for name in names:
        by_spec.setdefault(layer_specs[name], []).append(name)
    for (spec, group_size), members in by_spec.items():
        weights = [linears[name].weight for name in members]
        stacked = torch.cat([w.detach() for w in weights], dim=0) if len(weights) > 1 else weights[0]
        qt = gptq_quantize_weight(stacked, accumulator, spec, group_size, name=", ".join(members), **options)
        start = 0
        for name, w in zip(members, weights, strict=True):
            stop = start + w.shape[0]
            zero = qt.zero_point[start:stop] if qt.zero_point is not None else None
            results[name] = QuantizedTensor(qt.qdata[start:stop], qt.scale[start:stop], zero, spec, qt.granularity)
            start = stop
    return results


def _calibrate_and_quantize(
    run_batches: Callable[[Callable[[], None]], None],
    model_linears: dict[str, nn.Linear],
    layer_specs: LayerSpecs,
    options: dict[str, Any],
) -> dict[str, QuantizedTensor]:
    """Hook ``model_linears``, run the calibration once (``run_batches(end_of_batch)``), then GPTQ
    them: Linears reading the same input share one Hessian and one stacked GPTQ call."""
    hessians = _SharedHessians(model_linears)
    try:
        run_batches(hessians.end_batch)
    finally:
        hessians.remove()
    results: dict[str, QuantizedTensor] = {}
    for names, accumulator in hessians.groups():
        results.update(_quantize_group(names, model_linears, accumulator, layer_specs, options))
    return results


def _calibrate_and_quantize_in_order(
    run_batches: Callable[[Callable[[], None]], None],
    model_linears: dict[str, nn.Linear],
    layer_specs: LayerSpecs,
    options: dict[str, Any],
) -> dict[str, QuantizedTensor]:
    """True-sequential form of :func:`_calibrate_and_quantize` for one block: its Linears are
    quantized in the order the forward reaches them (q/k/v, o, gate/up, down), each set of
    Linears sharing an input calibrated on the inputs the block produces with the sets before
    it already quantized, so each corrects the error of those before it (GPTQModel's
    ``true_sequential``). One pass of the block per set after the first. The float weights
    are put back before returning."""
    hessians = _SharedHessians(model_linears)
    try:
        run_batches(hessians.end_batch)
    finally:
        hessians.remove()
    call_order = {name: index for index, name in enumerate(hessians.leader)}
    groups = sorted(hessians.groups(), key=lambda group: min(call_order.get(n, len(call_order)) for n in group[0]))
    results: dict[str, QuantizedTensor] = {}
    originals = {name: lin.weight.data for name, lin in model_linears.items()}
    try:
        for index, (names, accumulator) in enumerate(groups):
            if index:  # recalibrate this set on the block with the sets before it quantized
                hessians = _SharedHessians({name: model_linears[name] for name in names})
                try:
                    run_batches(hessians.end_batch)
                finally:
                    hessians.remove()
                (names, accumulator), *rest = hessians.groups()
                if rest:  # the set no longer shares one input: quantize each on its own
                    for more_names, more in rest:
                        results.update(_quantize_group(more_names, model_linears, more, layer_specs, options))
            results.update(_quantize_group(names, model_linears, accumulator, layer_specs, options))
            for name in model_linears:
                if name in results:
                    lin = model_linears[name]
                    lin.weight.data = dequantize_groups(results[name], lin.weight.dtype).to(lin.weight.device)
    finally:
        for name, lin in model_linears.items():
            lin.weight.data = originals[name]
    return results


def gptq_quantize_model(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    layer_specs: LayerSpecs,
    progress: Callable[[str, float], None] | None = None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search_steps: int = GPTQ_CLIP_SEARCH_STEPS,
    min_tokens: int = GPTQ_DEFAULT_MIN_TOKENS,
    act_order: bool = GPTQ_DEFAULT_ACT_ORDER,
    true_sequential: bool = GPTQ_DEFAULT_TRUE_SEQUENTIAL,
    sample_damp: float = GPTQ_DEFAULT_SAMPLE_DAMP,
) -> dict[str, QuantizedTensor]:
    """GPTQ every Linear named in ``layer_specs`` (``name -> (spec, group_size or None)``).

    Sequential over the model's stack of repeated blocks (a decoder's layers, BERT's encoder
    layers): the inputs of the first block are captured once, then per block its Linears are
    calibrated on the stored inputs, quantized, and the block's outputs recomputed *with* the
    quantized weights become the next block's inputs, so each block corrects the error of the
    ones before it and only one block's activations are held. Targets outside the stack (an
    lm_head, a pooler), and every target of a model without a recognisable stack, are
    calibrated on the float model's activations in one extra pass.

    ``calibration_batches``: batches as :func:`mono_quant.core.calibration.run_batch` takes
    them (tensor, tuple or dict of keyword inputs). ``progress(stage, fraction)`` is called
    after each block. The caller's model is left as it was: quantized weights are swapped in
    one block at a time and the float ones put back (also on error).

    Returns ``{name: QuantizedTensor}`` for every name in ``layer_specs``.

    Example:
        >>> from mono_quant.core.schemes import INT4_ASYMMETRIC
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> out = gptq_quantize_model(net, [torch.randn(64, 64)], {"0": (INT4_ASYMMETRIC, 32)})
        >>> sorted(out)
        ['0']
    """
    options = {
        "damp": damp,
        "block_size": block_size,
        "clip_search_steps": clip_search_steps,
        "min_tokens": min_tokens,
        "act_order": act_order,
        "sample_damp": sample_damp,
    }
    modules = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    for name in layer_specs:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ConfigurationError(
                f"GPTQ target {name!r} is {'missing' if module is None else type(module).__name__}, not an nn.Linear",
                suggestion="Name the model's Linear layers (model.named_modules()) in layer_specs.",
            )
        linears[name] = module
    batches = list(calibration_batches)
    if not batches:
        raise InputError("GPTQ needs calibration data, got no batches", suggestion="Pass at least one batch.")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    report = progress or (lambda stage, fraction: None)
    results: dict[str, QuantizedTensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stack = _find_layer_stack(model, linears)
            if stack is None:
                warnings.warn(
                    "GPTQ found no stack of repeated blocks in this model: every layer is calibrated on the "
                    "float model's activations (one pass) instead of block by block",
                    GPTQFallbackWarning,
                    stacklevel=2,
                )
                remaining = dict(linears)
            else:
                stack_name, blocks = stack
                results.update(
                    _sequential(
                        model,
                        stack_name,
                        blocks,
                        batches,
                        linears,
                        layer_specs,
                        options,
                        device,
                        report,
                        true_sequential,
                    )
                )
                remaining = {name: lin for name, lin in linears.items() if name not in results}
            if remaining:

                def run_model(end_of_batch):
                    for batch in batches:
                        run_batch(model, batch, device)
                        end_of_batch()

                results.update(_calibrate_and_quantize(run_model, remaining, layer_specs, options))
    finally:
        model.train(was_training)
    report("gptq", 1.0)
    return results


def _sequential(
    model: nn.Module,
    stack_name: str,
    blocks: nn.ModuleList,
    batches: list[Any],
    linears: dict[str, nn.Linear],
    layer_specs: LayerSpecs,
    options: dict[str, Any],
    device: torch.device,
    report: Callable[[str, float], None],
    true_sequential: bool = False,
) -> dict[str, QuantizedTensor]:
    """Block-by-block GPTQ over ``blocks`` (see :func:`gptq_quantize_model`)."""
    inputs: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        inputs.append((args, _drop_cache(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_batch(model, batch, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(batches):
        raise QuantizationError(
            f"GPTQ captured the inputs of {stack_name}[0] for {len(inputs)} of {len(batches)} calibration batches",
            suggestion="The model's forward must run its layer stack on every batch; check the calibration inputs.",
        )
    results: dict[str, QuantizedTensor] = {}
    prefix = f"{stack_name}." if stack_name else ""
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}{index}."
        block_linears = {name: lin for name, lin in linears.items() if name.startswith(block_prefix)}

        def run_block(end_of_batch, _block=block):
            for args, kwargs in inputs:
                _block(*args, **kwargs)
                end_of_batch()

        if block_linears:
            calibrate = _calibrate_and_quantize_in_order if true_sequential else _calibrate_and_quantize
            results.update(calibrate(run_block, block_linears, layer_specs, options))
        originals = {name: lin.weight.data for name, lin in block_linears.items()}
        try:
            for name, lin in block_linears.items():
                lin.weight.data = dequantize_groups(results[name], lin.weight.dtype).to(lin.weight.device)
            for position, (args, kwargs) in enumerate(inputs):
                out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                inputs[position] = _with_hidden(args, kwargs, hidden)
        finally:
            for name, lin in block_linears.items():
                lin.weight.data = originals[name]
        report("gptq", (index + 1) / (len(blocks) + 1))
    return results
