"""The accuracy target: ``quantize(..., max_accuracy_loss=0.01)`` moves the most sensitive
layers up one precision at a time until the loss on eval data holds.

How, in three steps (read :func:`quantize_to_target` top to bottom):

1. **The ladder of each layer.** From what the plan makes of it, a layer can move up
   ``int4-g128 -> int4-g32 -> int8 -> float`` (int4 at a group size above 32 first takes 32;
   in int8 runs with quantized activations ``int8 -> int8-weight-only -> float``). The last
   step is ``float`` rather than fp16: exact, stored by every export format, and on CPUs an
   fp16 matmul is slower than fp32.
2. **Ranking on real activations.** One pass of the float model over calibration batches
   (the eval batches when there are none) measures, for every layer and every rung of its
   ladder, the layer's relative output error ``|y_q - y|^2 / |y|^2`` on its real inputs
   (the quantized layer runs exactly as it will in the model: activation quantization,
   SmoothQuant scales and all). Layers reading the same input (q/k/v, gate/up) form one
   unit: serving stacks fuse them, so they move together. Local errors miss downstream
   amplification, so one short forward per unit with only that unit quantized measures how
   much of its error reaches the model's output, and scales the unit's errors by that gain.
   Bytes per rung come from the stored layout. A greedy marginal analysis (each step: the
   move with the largest error drop per byte added, possibly skipping a rung that buys
   little) orders every possible move into one list.
3. **The search.** Trial 0 is the plan as asked. Then a prefix of the move list is applied,
   doubling its length until the target holds, then bisecting between the last miss and the
   first hit, each trial a real quantization and evaluation (perplexity for causal LMs,
   output cosine otherwise; see ``core/evaluation``), until the target holds at the smallest
   prefix found or ``max_trials`` / ``max_tuning_seconds`` run out. Moves to float stop once
   half of the weights the plan quantizes would be float (:data:`MAX_FLOAT_FRACTION`): a
   target met by not quantizing is reported as not met instead.

The result is the best configuration found: the smallest prefix that met the target, or,
when none did, the trial with the lowest loss, with a warning (the model is usable;
``info.metrics["accuracy_target"]["met"]`` is False). ``info.layer_overrides`` records the
outcome as ``{layer: precision}`` (the caller's own overrides included), which
``quantize(..., layer_overrides=...)`` reproduces without a search.

HQQ / GPTQ tensors are cached per (layer, weight config) across trials, so a trial only
recomputes the layers that moved (GPTQ then sees earlier layers' inputs as the previous
trial left them: a small approximation of its sequential order).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Any

import torch
from torch import nn

from mono_quant.core.calibration import batch_rows, first_tensor, iter_calibration_batches, slice_batch
from mono_quant.core.evaluation import Evaluator
from mono_quant.core.options import Precision, QuantizeOptions, parse_precision
from mono_quant.core.plan import (
    LayerDecision,
    QuantizationPlan,
    compile_overrides,
    decide,
    plan_module,
    precision_of,
    weight_layout,
)
from mono_quant.core.progress import Progress
from mono_quant.core.quantizers import (
    PreparedRun,
    QuantizationInfo,
    build_layer,
    build_run,
    prepare_run,
    statistics_batches,
    statistics_source,
)
from mono_quant.errors import ConfigurationError

__all__ = ["quantize_to_target", "ladder", "split_eval", "Move", "HELD_OUT_FRACTION", "MAX_FLOAT_FRACTION"]

# Without eval_data, this fraction of the calibration batches (at least one) is held out.
HELD_OUT_FRACTION = 0.25
# Ranking pass: about this many input elements per sample row x rows (tokens for LMs) from the
# first calibration batch, and quantized rung layers alive at once (in weight elements), so the
# pass stays short and within a bounded memory on large models.
_RANKING_INPUT_ELEMENTS = 4096
# the output-sensitivity forwards (one per unit) run on fewer: 128 tokens of an LM; they are
# skipped (local errors alone rank the moves) when they would take longer than this
_SENSITIVITY_INPUT_ELEMENTS = 128
_SENSITIVITY_MAX_SECONDS = 300.0
_RANKING_CHUNK_ELEMENTS = 512 * 2**20
_MIN_SEARCH_GROUP = 32
# At most this fraction of the weights the plan quantizes may end up float.
MAX_FLOAT_FRACTION = 0.5


def ladder(precision: str, run_activation: str) -> list[str]:
    """The precisions a layer at ``precision`` can move up to, in order.

    Example:
        >>> ladder("int4-g128", "none")
        ['int4-g32', 'int8', 'float']
        >>> ladder("int8", "dynamic")
        ['int8-weight-only', 'float']
    """
    parsed = parse_precision(precision)
    steps: list[str] = []
    if parsed.bits == 4:
        if parsed.group_size > _MIN_SEARCH_GROUP:
            steps.append(f"int4-g{_MIN_SEARCH_GROUP}")
        steps.append("int8")
        parsed = Precision(bits=8)
    if parsed.bits == 8:
        if not parsed.weight_only and run_activation != "none":
            steps.append("int8-weight-only")
        steps.append("float")
    return steps


def split_eval(batches: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(calibration, held out)`` of a list of batches: the last :data:`HELD_OUT_FRACTION` of
    them (at least one); a single batch is split along its rows. Raises when it cannot be."""
    if len(batches) >= 2:
        held = max(1, round(len(batches) * HELD_OUT_FRACTION))
        return batches[:-held], batches[-held:]
    batch = batches[0] if batches else None
    rows = batch_rows(batch) if batch is not None else 0
    if rows < 2:
        raise ConfigurationError(
            "max_accuracy_loss needs eval data, and the calibration data is one sample: nothing to hold out",
            suggestion="Pass eval_data (inputs like the calibration data, kept apart from it), or more "
            "calibration samples (a quarter of them is then held out).",
        )
    held = max(1, round(rows * HELD_OUT_FRACTION))
    return [slice_batch(batch, 0, rows - held)], [slice_batch(batch, rows - held, rows)]


@dataclasses.dataclass(frozen=True)
class Move:
    """One step of the search: ``layers`` (one layer, or siblings reading the same input such as
    q/k/v, which move together: serving stacks fuse them into one matrix) go to ``precision``;
    ``error`` is their relative output error there, ``added_bytes`` what the step costs."""

    layers: tuple[str, ...]
    precision: str
    error: float
    added_bytes: int


@dataclasses.dataclass
class _Rung:
    precision: str
    decision: LayerDecision
    bytes: int
    error: float = 0.0


def _stored_bytes(decision: LayerDecision, module: nn.Module) -> int:
    weight = module.weight
    if decision.config is None:
        if decision.cast is not None:
            return weight.numel() * torch.empty((), dtype=decision.cast).element_size()
        return weight.numel() * weight.element_size()
    layout = weight_layout(decision.config, tuple(weight.shape))
    return sum(math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size() for t in layout)


def _rungs(plan: QuantizationPlan, model: nn.Module, name: str) -> list[_Rung]:
    """The base decision of ``name`` and each step of its ladder, as decisions of the plan's
    own rules (a step the layer kind cannot take, like int4 for an odd width, is dropped)."""
    options = plan.options
    base = plan.layers[name]
    module = model.get_submodule(name)
    rungs = [_Rung(precision_of(base, options), base, _stored_bytes(base, module))]
    for precision in ladder(rungs[0].precision, options.activation):
        step_options = dataclasses.replace(options, layer_overrides=((name, precision),))
        decision = decide(
            name,
            base.kind,
            base.shape,
            step_options,
            output_head=base.output_head,
            overrides=compile_overrides(step_options),
            statistics=plan.statistics,
        )
        reached = precision_of(decision, options)
        if reached == rungs[-1].precision or reached != precision:
            continue
        rungs.append(_Rung(precision, decision, _stored_bytes(decision, module)))
    return rungs


class _ErrorMeter:
    """Forward hooks on the float model: each watched layer's real input also goes through its
    rung layers, and the squared error to the float output is summed per rung."""

    def __init__(self, layers: dict[str, list[tuple[_Rung, nn.Module]]]) -> None:
        self.layers = layers
        self.error = {name: [0.0] * len(rungs) for name, rungs in layers.items()}
        self.signal = dict.fromkeys(layers, 0.0)
        self._inputs: dict[str, tuple] = {}
        # consecutive layers called on the very same input tensor (q/k/v, gate/up): siblings
        self.siblings: list[list[str]] = []
        self._last_input: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> list:
        handles = []
        for name in self.layers:
            module = model.get_submodule(name)
            # prepend: the raw input, before a SmoothQuant pre-hook divides it (the rung layers
            # divide it themselves, as they will in the quantized model)
            handles.append(module.register_forward_pre_hook(self._pre(name), prepend=True))
            handles.append(module.register_forward_hook(self._post(name)))
        return handles

    def _pre(self, name):
        def hook(_module, args):
            self._inputs[name] = args
            first = args[0] if args else None
            if first is not None and first is self._last_input:
                if name not in self.siblings[-1]:
                    self.siblings[-1].append(name)
            else:
                self.siblings.append([name])
                self._last_input = first

        return hook

    def _post(self, name):
        def hook(_module, _args, output):
            args = self._inputs.pop(name, None)
            if args is None or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            reference = output.float()
            self.signal[name] += float(reference.square().sum())
            for index, (_rung, layer) in enumerate(self.layers[name]):
                if layer is None:  # float: no error
                    continue
                self.error[name][index] += float((layer(*args).float() - reference).square().sum())

        return hook


@torch.inference_mode()
def _measure_rungs(
    prepared: PreparedRun, plan: QuantizationPlan, candidates: list[str], batches: list[Any], progress: Progress
) -> tuple[dict[str, list[_Rung]], list[list[str]]]:
    """Every candidate's rungs with their relative output error on ``batches``, and the groups
    of candidates that read the same input (seen in the first chunk's pass)."""
    from mono_quant.core.calibration import run_batch

    source = prepared.source
    device = next((p.device for p in source.parameters()), torch.device("cpu"))
    all_rungs = {name: _rungs(plan, source, name) for name in candidates}
    chunks: list[list[str]] = [[]]
    elements = 0
    for name in candidates:
        size = source.get_submodule(name).weight.numel() * len(all_rungs[name])
        # a chunk ends only where the parent module changes, so siblings (q/k/v) stay together
        parent = name.rpartition(".")[0]
        if chunks[-1] and elements + size > _RANKING_CHUNK_ELEMENTS and parent != chunks[-1][-1].rpartition(".")[0]:
            chunks.append([])
            elements = 0
        chunks[-1].append(name)
        elements += size
    training = [(m, m.training) for m in source.modules()]
    source.eval()
    siblings: list[list[str]] = []
    base_layers: dict[str, nn.Module] = {}  # each candidate at its base precision
    try:
        for index, chunk in enumerate(chunks):
            layers = {}
            for name in chunk:
                module = source.get_submodule(name)
                built = []
                for rung in all_rungs[name]:
                    layer = None
                    if rung.decision.config is not None:
                        layer, _, _ = build_layer(
                            module,
                            rung.decision.config,
                            input_qparams=(prepared.input_qparams or {}).get(name),
                            input_smoothing=prepared.input_smoothing.get(name),
                            column_weights=prepared.column_weights.get(name),
                        )
                    built.append((rung, layer))
                layers[name] = built
                if built[0][1] is not None:
                    base_layers[name] = built[0][1]
            meter = _ErrorMeter(layers)
            handles = meter.attach(source)
            try:
                for batch in batches:
                    run_batch(source, batch, device)
            finally:
                for handle in handles:
                    handle.remove()
            siblings.extend(meter.siblings)
            for name in chunk:
                signal = meter.signal[name] or 1.0
                for rung, error in zip(all_rungs[name], meter.error[name], strict=True):
                    rung.error = error / signal
            progress.report("rank", (index + 1) / len(chunks))
    finally:
        for module, flag in training:
            module.training = flag
    return all_rungs, siblings, base_layers


class _Substitute:
    """Forward hook: the module's output replaced by ``layer``'s on the same input."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, _module, args, _output):
        return self.layer(*args)


@torch.inference_mode()
def _output_sensitivity(
    prepared: PreparedRun,
    units: dict[tuple[str, ...], list[_Rung]],
    base_layers: dict[str, nn.Module],
    batch: Any,
    progress: Progress,
) -> bool:
    """Scale each unit's rung errors by how much its own base-precision error reaches the
    model's output. Local relative errors miss downstream amplification: in SmolLM2 the first
    blocks' down_proj / o_proj (where the huge "attention sink" activations are written) show
    a relative error of 4e-5 at int8, yet moving five of them changed perplexity by 2%. One
    forward per unit, with only that unit quantized, measures it: the gain is the relative
    change of the model's output over the unit's local error. Returns False (nothing scaled)
    when the forwards would take more than :data:`_SENSITIVITY_MAX_SECONDS`."""
    from mono_quant.core.calibration import run_batch
    from mono_quant.core.evaluation import first_float_output

    source = prepared.source
    device = next((p.device for p in source.parameters()), torch.device("cpu"))
    started = time.perf_counter()
    reference = first_float_output(run_batch(source, batch, device))
    if reference is None:
        return False
    estimate = (time.perf_counter() - started) * len(units)
    if estimate > _SENSITIVITY_MAX_SECONDS:
        return False
    reference = reference.float()
    scale = float(reference.square().sum()) or 1.0
    for index, (unit, rungs) in enumerate(units.items()):
        local = rungs[0].error
        if local <= 0 or any(name not in base_layers for name in unit):
            continue
        handles = [source.get_submodule(name).register_forward_hook(_Substitute(base_layers[name])) for name in unit]
        try:
            output = first_float_output(run_batch(source, batch, device))
        finally:
            for handle in handles:
                handle.remove()
        gain = float((output.float() - reference).square().sum()) / scale / local
        for rung in rungs:
            rung.error *= gain
        progress.report("sensitivity", (index + 1) / len(units))
    return True


def _units(all_rungs: dict[str, list[_Rung]], siblings: list[list[str]]) -> dict[tuple[str, ...], list[_Rung]]:
    """The units that move together, with their summed rungs: a group of siblings whose ladders
    agree (same precisions) is one unit; any other layer is a unit of its own."""
    units: dict[tuple[str, ...], list[_Rung]] = {}
    grouped: set[str] = set()
    for group in siblings:
        members = [name for name in group if name in all_rungs and name not in grouped]
        ladders = {tuple(r.precision for r in all_rungs[name]) for name in members}
        if len(members) < 2 or len(ladders) != 1:
            continue
        rungs = []
        for index, first in enumerate(all_rungs[members[0]]):
            rungs.append(
                _Rung(
                    first.precision,
                    first.decision,
                    sum(all_rungs[name][index].bytes for name in members),
                    sum(all_rungs[name][index].error for name in members),
                )
            )
        units[tuple(members)] = rungs
        grouped.update(members)
    for name, rungs in all_rungs.items():
        if name not in grouped:
            units[(name,)] = rungs
    return units


def _order_moves(units: dict[tuple[str, ...], list[_Rung]]) -> list[Move]:
    """Greedy marginal analysis: repeatedly take the move (a unit to one of its higher rungs)
    with the largest error reduction per byte added, over all units."""
    position = dict.fromkeys(units, 0)

    def best_step(unit: tuple[str, ...]) -> tuple[float, int] | None:
        rungs, here = units[unit], position[unit]
        best = None
        for target in range(here + 1, len(rungs)):
            gain = rungs[here].error - rungs[target].error
            cost = max(rungs[target].bytes - rungs[here].bytes, 1)
            if gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, target)
        return best

    heap = []
    for unit in units:
        step = best_step(unit)
        if step is not None:
            heapq.heappush(heap, (-step[0], unit, step[1]))
    moves = []
    while heap:
        _, unit, target = heapq.heappop(heap)
        rungs = units[unit]
        added = rungs[target].bytes - rungs[position[unit]].bytes
        moves.append(Move(unit, rungs[target].precision, rungs[target].error, added))
        position[unit] = target
        step = best_step(unit)
        if step is not None:
            heapq.heappush(heap, (-step[0], unit, step[1]))
    return moves


def _cap_float(moves: list[Move], elements: dict[str, int]) -> list[Move]:
    """``moves`` without the moves to float that would leave more than
    :data:`MAX_FLOAT_FRACTION` of the candidates' weights float: a model that meets the
    target by not being quantized is not a quantized model."""
    budget = MAX_FLOAT_FRACTION * sum(elements.values())
    floating, kept = 0, []
    for move in moves:
        if move.precision == "float":
            size = sum(elements[name] for name in move.layers)
            if floating + size > budget:
                continue
            floating += size
        kept.append(move)
    return kept


def _ranking_batch(batch: Any, elements: int = 0) -> Any:
    """The first rows of ``batch``, about ``elements`` input elements (default
    :data:`_RANKING_INPUT_ELEMENTS`)."""
    elements = elements or _RANKING_INPUT_ELEMENTS
    first = first_tensor(batch)
    if first is None or first.dim() == 0 or first.shape[0] < 2:
        return batch
    rows = int(first.shape[0])
    per_row = max(first[0].numel(), 1)
    return slice_batch(batch, 0, max(1, min(rows, elements // per_row)))


def _pattern(name: str) -> str:
    """A layer name as a ``layer_overrides`` pattern that matches only it."""
    if any(c in name for c in "*?[]"):
        import re

        return "re:" + re.escape(name)
    return name


def _overrides_after(moves: list[Move], count: int) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for move in moves[:count]:
        for name in move.layers:
            chosen[name] = move.precision  # a later move of the same layer supersedes
    return {_pattern(name): precision for name, precision in chosen.items()}


def _eval_batches(eval_data: Any, options: QuantizeOptions) -> list[Any]:
    return [batch for batch, _ in iter_calibration_batches(eval_data, 2**62, options.effective_calibration_batch_size)]


def quantize_to_target(
    model: nn.Module,
    options: QuantizeOptions,
    batches: list[Any] | None,
    eval_data: Any,
    progress: Progress,
) -> tuple[nn.Module, QuantizationInfo]:
    """The accuracy-target search (see the module docstring). ``batches``: the calibration
    batches (None for a data-free run given only ``eval_data``)."""
    started = time.perf_counter()
    target = options.max_accuracy_loss
    if eval_data is not None:
        eval_batches = _eval_batches(eval_data, options)
        notes = []
    elif batches:
        batches, eval_batches = split_eval(batches)
        notes = [f"eval data: the last {len(eval_batches)} of the calibration batches, held out (eval_data not given)"]
    else:
        raise ConfigurationError(
            "max_accuracy_loss needs data to measure the loss on",
            suggestion="Pass eval_data (inputs like those the model will see), or calibration_data, a quarter of "
            "which is then held out for evaluation.",
        )
    user_overrides = dict(options.layer_overrides or ())
    calibration = batches if options.uses_calibration() and batches else None
    statistics = statistics_batches(model, options, calibration)
    plan = plan_module(model, options, statistics=statistics_source(statistics, calibration))
    prepared = prepare_run(model, plan, calibration, progress, statistics)
    evaluator = Evaluator(model, eval_batches)
    cache: dict = {}
    trials: list[dict[str, Any]] = []
    best: tuple[float, int, nn.Module, QuantizationInfo] | None = None  # (loss, moves, model, info)

    def trial(count: int, moves: list[Move]) -> float:
        nonlocal best
        trial_started = time.perf_counter()
        overrides = {**_overrides_after(moves, count), **user_overrides}
        trial_options = dataclasses.replace(options, layer_overrides=tuple(overrides.items()) or None)
        trial_plan = plan_module(model, trial_options, statistics=plan.statistics)
        quantized, info = build_run(prepared, trial_plan, Progress(), weight_cache=cache)
        value = evaluator.value(quantized)
        loss = evaluator.loss_of(value)
        size = info.quantized_size_bytes or 0
        trials.append(
            {
                "trial": len(trials),
                "moved": count,
                evaluator.metric: value,
                "loss": loss,
                "met": loss <= target,
                "quantized_size_bytes": size,
                "compression_ratio": info.compression_ratio,
                "seconds": round(time.perf_counter() - trial_started, 3),
            }
        )
        if _better(loss, count, best, target):
            best = (loss, count, quantized, info)
        progress.report("tune", len(trials) / options.effective_max_trials)
        return loss

    def budget_left() -> bool:
        if len(trials) >= options.effective_max_trials:
            return False
        limit = options.max_tuning_seconds
        return limit is None or time.perf_counter() - started < limit

    moves: list[Move] = []
    if trial(0, moves) > target and budget_left():
        fixed = [pattern for pattern, _, _ in compile_overrides(options)]  # the caller's own overrides
        candidates = [
            name
            for name, d in plan.layers.items()
            if d.config is not None
            and d.kind in ("linear", "embedding", "conv1d", "conv2d")
            and not any(pattern.fullmatch(name) for pattern in fixed)
        ]
        ranking = [_ranking_batch((batches or eval_batches)[0])]
        if not batches:
            notes.append("layers ranked on the eval data (no calibration_data given)")
        all_rungs, siblings, base_layers = _measure_rungs(prepared, plan, candidates, ranking, progress)
        units = _units(all_rungs, siblings)
        sensitivity = _ranking_batch((batches or eval_batches)[0], _SENSITIVITY_INPUT_ELEMENTS)
        if not _output_sensitivity(prepared, units, base_layers, sensitivity, progress):
            notes.append("moves ranked by local layer errors only (per-unit output sensitivity would be too slow)")
        del base_layers
        moves = _order_moves(units)
        moves = _cap_float(moves, {name: model.get_submodule(name).weight.numel() for name in candidates})
        low, high = 0, None  # moves applied: low misses the target, high meets it
        count = max(1, math.ceil(len(moves) / 32))
        while moves and budget_left():
            if high is None:
                count = min(count, len(moves))
                if trial(count, moves) <= target:
                    high = count
                elif count == len(moves):
                    break
                else:
                    low, count = count, count * 2
                continue
            if high - low <= 1:
                break
            middle = (low + high) // 2
            if trial(middle, moves) <= target:
                high = middle
            else:
                low = middle
    loss, count, quantized, info = best
    met = loss <= target
    info.warnings.extend(notes)
    info.metrics["accuracy_target"] = {
        "max_accuracy_loss": target,
        "met": met,
        "metric": evaluator.metric,
        "baseline": evaluator.baseline,
        "loss": loss,
        "moved_layers": len(_overrides_after(moves, count)),
        "moves_ranked": len(moves),
        "eval_batches": len(eval_batches),
        "trials": trials,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not met:
        info.warnings.append(
            f"accuracy target max_accuracy_loss={target} not met: the best of {len(trials)} trials lost {loss:.3g} "
            f"({evaluator.metric}); the model is that best configuration. Raise max_trials / max_tuning_seconds, "
            "or accept a larger loss."
        )
    info.duration_s = time.perf_counter() - started
    return quantized, info


def _better(loss: float, count: int, best: tuple | None, target: float) -> bool:
    """Whether a trial beats the best so far: meeting the target with fewer moves, or, while
    nothing met it, a lower loss."""
    if best is None:
        return True
    best_loss, best_count = best[0], best[1]
    if loss <= target:
        return best_loss > target or count < best_count
    return best_loss > target and loss < best_loss
