"""SmoothQuant: move activation outliers into the weights with a per-input-channel scale.

After Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (2022), reference ``smooth.py`` in mit-han-lab/smoothquant (``smooth_ln_fcs``,
``smooth_lm``). For a Linear ``y = x W^T`` and a positive scale ``s [K]``,
``y = (x / s) (W * s)^T`` exactly; with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)     (W_j: column j of every Linear reading x)

the activation's outlier channels shrink and the weights' matching columns grow, which
per-token int8 activations tolerate far better. ``1 / s`` is folded into whatever produces
``x`` when that is free:

* a pre-norm block's RMSNorm/LayerNorm (Llama's ``input_layernorm`` -> q/k/v,
  ``post_attention_layernorm`` -> gate/up: the reference's Llama rule): weight (and bias)
  divided by ``s``; the norm's output feeds only those Linears, the residual bypasses it;
* the value projection, for the attention output projection (``o_proj``, BERT's
  ``attention.output.dense``): the attention mixes tokens, never channels, so scaling V's
  output channel ``j`` scales the context's channel ``j``. Only when every query head has its
  own value head (no grouped-query attention, where one V channel feeds several heads);
* the up projection, for a gated FFN's ``down_proj`` (its input is ``act(gate(x)) * up(x)``,
  linear in ``up``'s output channels; AWQ's mapping).

Where no free fold exists the scale is returned as an *input scale*: the Linear's weight is
multiplied by ``s`` here and the activation quantizer must divide its input by ``s`` (fused
into the per-token quantization step). That covers ungated FFN down projections (their input
comes from an activation function), grouped-query ``o_proj`` and all of BERT's other Linears:
BERT is post-norm, so a LayerNorm's output is also the residual stream and folding ``1/s``
into it would change the model (the reference does not smooth BERT at all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from mono_quant.core.calibration import ObservedForward
from mono_quant.core.options import DEFAULT_SMOOTHING_ALPHA
from mono_quant.core.schemes import INT8_ASYMMETRIC, INT8_SYMMETRIC, choose_qparams, quantize
from mono_quant.errors import ConfigurationError, InputError
from mono_quant.modules.kernels import quantize_per_token_asymmetric

__all__ = [
    "SmoothingGroup",
    "collect_activation_absmax",
    "collect_input_mean_squares",
    "collect_activation_samples",
    "collect_smoothing_statistics",
    "synthetic_token_batches",
    "smoothing_scales",
    "smoothing_plan",
    "apply_smoothing",
    "DEFAULT_SMOOTHING_ALPHA",
]

# Per group, with activation samples: the alpha of these (and the one asked for) with the lowest
# int8 dynamic output error on the samples (Intel Neural Compressor's "auto" alpha, per layer).
AUTO_ALPHA_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# The reference clamps both the weight maxima and the scales at 1e-5.
_MIN_MAGNITUDE = 1e-5


class SmoothingGroup(NamedTuple):
    """Linears reading one activation, and where their ``1 / scales`` goes.

    ``source``: name of the norm or value-projection Linear whose output channels are divided
    by ``scales``, or None when the scale cannot be folded (an input scale for the activation
    quantizer). ``linears``: names of the Linears whose weight columns are multiplied by
    ``scales [K]``.
    """

    source: str | None
    linears: list[str]
    scales: torch.Tensor


def _observe_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Iterable[str],
    observe: Callable[[str, torch.Tensor], None],
    strict: bool = True,
) -> None:
    """Run ``batches`` through ``model`` (eval, no grad), calling ``observe(name, x [T, K])``
    with every input of each named Linear; raises when one never ran (``strict``; otherwise
    the caller finds it missing from what it collected). The model is only read."""
    modules = dict(model.named_modules())
    names = list(layer_names)
    seen: set[str] = set()
    handles = []
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ConfigurationError(
                f"smoothing target {name!r} is {'missing' if module is None else type(module).__name__}, not a Linear",
                suggestion="Name the model's Linear layers (model.named_modules()).",
            )

        def hook(mod, args, _name=name):
            x = args[0].detach()
            seen.add(_name)
            observe(_name, x.reshape(-1, x.shape[-1]))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    # each module's own flag: a model in training mode may hold frozen (eval) parts
    training_flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), ObservedForward(model, [modules[name] for name in names], device) as forward:
            for batch in batches:
                forward.run(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags:
            module.training = flag
    missing = [name for name in names if name not in seen]
    if missing and strict:
        raise InputError(
            f"{len(missing)} Linear(s) never ran on the calibration data, e.g. {missing[0]!r}",
            suggestion="Use calibration inputs that exercise every layer, or leave those layers out.",
        )


def collect_activation_absmax(
    model: nn.Module, batches: Iterable[Any], layer_names: Iterable[str], strict: bool = True
) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` over every calibration token of each named Linear.

    ``batches``: as :func:`mono_quant.core.calibration.run_batch` takes them. Returns
    ``{name: Tensor [in_features]}`` fp32, on the model's device. The model is only read. A
    Linear that never ran raises InputError, or (``strict=False``) is left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> collect_activation_absmax(net, [torch.tensor([[1.0, -2.0, 0.0, 0.5]])], ["0"])["0"]
        tensor([1.0000, 2.0000, 0.0000, 0.5000])
    """
    return collect_smoothing_statistics(model, batches, layer_names, samples=False, strict=strict)[0]


def collect_input_mean_squares(
    model: nn.Module, batches: Iterable[Any], layer_names: Iterable[str], strict: bool = True
) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of ``x^2`` over every token of each named Linear: the diagonal
    of its inputs' Hessian (up to a factor 2), the importance weights
    :func:`~mono_quant.core.algorithms.hqq.hqq_quantize_weight` takes as ``column_weights``.

    Returns ``{name: Tensor [in_features]}`` fp32 (``strict=False``: Linears that never ran
    are left out instead of raising).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3))
        >>> collect_input_mean_squares(net, [torch.tensor([[1.0, 2.0], [3.0, 0.0]])], ["0"])["0"]
        tensor([5., 2.])
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        current = x.float().square().sum(dim=0)
        sums[name] = current if name not in sums else sums[name] + current
        counts[name] = counts.get(name, 0) + x.shape[0]

    _observe_inputs(model, batches, layer_names, observe, strict)
    return {name: total / max(counts[name], 1) for name, total in sums.items()}


def collect_activation_samples(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Iterable[str],
    max_tokens: int = 512,
    seed: int = 0,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Up to ``max_tokens`` input rows ``[T, in_features]`` of each named Linear, drawn
    uniformly (seeded) from every calibration token: what :func:`smoothing_plan` measures
    each candidate alpha on. Memory: ``max_tokens * in_features`` floats per Linear.
    ``strict``: as :func:`collect_activation_absmax`."""
    return collect_smoothing_statistics(model, batches, layer_names, True, max_tokens, seed, strict)[1]


def collect_smoothing_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Iterable[str],
    samples: bool = True,
    max_tokens: int = 512,
    seed: int = 0,
    strict: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """What :func:`smoothing_plan` takes, in one pass over ``batches``: the per-channel maxima
    of :func:`collect_activation_absmax` and (``samples``) the input rows of
    :func:`collect_activation_samples`, else None."""
    absmax: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)

    def pick(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= max_tokens:
            return x
        return x[torch.randperm(x.shape[0], generator=generator)[:max_tokens].sort().values.to(x.device)]

    def observe(name: str, x: torch.Tensor) -> None:
        current = x.abs().amax(dim=0).float()
        previous = absmax.get(name)
        absmax[name] = current if previous is None else torch.maximum(previous, current)
        if samples:  # at most max_tokens rows of each batch, then max_tokens of those: memory stays bounded
            rows.setdefault(name, []).append(pick(x.float()))

    _observe_inputs(model, batches, layer_names, observe, strict)
    return absmax, ({name: pick(torch.cat(parts)) for name, parts in rows.items()} if samples else None)


def synthetic_token_batches(
    model: nn.Module, batches: int = 2, rows: int = 16, length: int = 16, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches without data: token ids drawn uniformly (seeded) from the model's
    input embedding table, ``[{"input_ids", "attention_mask"} [rows, length]]``.

    Per-channel activation statistics (max |x|, mean x^2) of a transformer are set mostly by
    its weights (norm gains, outlier channels), not by the text: measured on MiniLM, SmoothQuant
    scales from 2 x 16 x 16 random tokens give int8 dynamic 0.9989 (real sentences: 0.9990,
    none: 0.9973); see bench/accuracy_algorithms.py. Raises InputError for a model with no
    token embedding.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4))
        >>> net.get_input_embeddings = lambda: net[0]
        >>> synthetic_token_batches(net, 1, 2, 3)[0]["input_ids"].shape
        torch.Size([2, 3])
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise InputError(
            f"synthetic calibration needs a token embedding, {type(model).__name__} has none",
            suggestion="Pass calibration_data (a few batches of real inputs) instead.",
        )
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, embedding.num_embeddings, (rows, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def smoothing_scales(activation_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [K] = max|X|^alpha / max|W|^(1 - alpha)``, the weight max over every ``[N_i, K]``
    weight reading the activation. Channels never active (or with all-zero weights) get 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigurationError(
            f"smoothing alpha must be in [0, 1], got {alpha!r}",
            suggestion="Use 0.5 (the reference's default); 0.8-0.85 moves more into the weights.",
        )
    act = activation_absmax.float()
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float().to(act.device) for w in weights]).amax(dim=0)
    scales = act.pow(alpha) / weight_max.clamp(min=_MIN_MAGNITUDE).pow(1.0 - alpha)
    dead = (act <= 0) | (weight_max <= 0) | ~torch.isfinite(scales)
    return torch.where(dead, torch.ones_like(scales), scales.clamp(min=_MIN_MAGNITUDE))


def _norm_like(module: nn.Module | None) -> bool:
    """A per-channel affine norm whose output is ``normalised * weight (+ bias)``."""
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _attr(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _block_rules(name: str, block: nn.Module) -> list[tuple[str | None, list[str]]]:
    """``[(source or None, [linear paths])]`` for one recognised block, paths relative to it."""
    prefix = f"{name}." if name else ""
    rules: list[tuple[str | None, list[str]]] = []
    attn = _attr(block, "self_attn")
    mlp = _attr(block, "mlp")
    if attn is not None and mlp is not None and _norm_like(_attr(block, "input_layernorm")):
        # Pre-norm decoder (Llama, Mistral, Qwen2): the reference's smooth_ln_fcs_llama_like.
        qkv = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj") if _attr(attn, p) is not None]
        rules.append(("input_layernorm", qkv))
        ffn_in = [f"mlp.{p}" for p in ("gate_proj", "up_proj") if _attr(mlp, p) is not None]
        post = "post_attention_layernorm" if _norm_like(_attr(block, "post_attention_layernorm")) else None
        rules.append((post, ffn_in))
        value, output = _attr(attn, "v_proj"), _attr(attn, "o_proj")
        if isinstance(value, nn.Linear) and isinstance(output, nn.Linear):
            foldable = value.out_features == output.in_features  # no grouped-query sharing
            rules.append(("self_attn.v_proj" if foldable else None, ["self_attn.o_proj"]))
        # Gated FFN (SwiGLU): down_proj reads act(gate(x)) * up(x), so channel j of up_proj's
        # output scales channel j of down_proj's input (AWQ's up_proj -> down_proj mapping).
        up, down = _attr(mlp, "up_proj"), _attr(mlp, "down_proj")
        gated = _attr(mlp, "gate_proj") is not None and isinstance(up, nn.Linear) and isinstance(down, nn.Linear)
        foldable = gated and up.out_features == down.in_features
        rules.append(("mlp.up_proj" if foldable else None, ["mlp.down_proj"]))
    elif _attr(block, "attention.self.query") is not None and _attr(block, "intermediate.dense") is not None:
        # BERT (post-norm): only the value -> attention output fold is free.
        rules.append((None, [f"attention.self.{p}" for p in ("query", "key", "value")]))
        rules.append(("attention.self.value", ["attention.output.dense"]))
        rules.append((None, ["intermediate.dense"]))
        rules.append((None, ["output.dense"]))
    return [(None if src is None else prefix + src, [prefix + lin for lin in lins]) for src, lins in rules]


def smoothing_plan(
    model: nn.Module,
    activation_absmax: dict[str, torch.Tensor],
    alpha: float = DEFAULT_SMOOTHING_ALPHA,
    activation_samples: dict[str, torch.Tensor] | None = None,
    alpha_candidates: Iterable[float] = AUTO_ALPHA_CANDIDATES,
    static_symmetric: bool | None = None,
    folded_only: bool = False,
    dynamic_asymmetric: bool = False,
) -> list[SmoothingGroup]:
    """Where each Linear in ``activation_absmax`` gets its smoothing scale and its ``1 / s``.

    Recognised blocks (pre-norm decoders with ``input_layernorm``/``self_attn``/``mlp``, BERT
    layers) give the folds described in the module docstring; Linears sharing an input share
    one scale. Any other Linear in ``activation_absmax`` gets an unfoldable group of its own.

    With ``activation_samples`` (:func:`collect_activation_samples`), each group takes the alpha
    among ``alpha_candidates`` and ``alpha`` whose int8 output error on its samples is lowest:
    per-token int8's (dynamic, ``static_symmetric=None``; each token's own zero point with
    ``dynamic_asymmetric``), or static int8's
    (:func:`_int8_static_error`: one activation scale per tensor, the min/max observer's, on a
    symmetric grid if ``static_symmetric`` else asymmetric) measured on samples its range was
    not taken from, where no smoothing at all is a candidate too: a group it wins for is left
    out of the plan. ``folded_only``: groups
    with no source to fold into are left out (nothing divides its input at run time). Measured on MiniLM,
    calibrated and evaluated on different sentences: dynamic 0.99897 at a fixed 0.5, 0.99905
    chosen per group; static 0.99336 unsmoothed, 0.99748 at a fixed 0.8, 0.99828 per group.
    Reads the model only.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> plan = smoothing_plan(net, {"0": torch.tensor([1.0, 8.0, 1.0, 1.0])})
        >>> plan[0].source, plan[0].linears
        (None, ['0'])
    """
    modules = dict(model.named_modules())
    planned: list[tuple[str | None, list[str]]] = []
    covered: set[str] = set()
    for name, module in modules.items():
        for source, linears in _block_rules(name, module):
            present = [lin for lin in linears if lin in activation_absmax and lin not in covered]
            if not present:
                continue
            if source is not None and len(present) != len(linears):
                source = None  # a fold changes every reader of the source: all must be smoothed
            planned.append((source, present))
            covered.update(present)
    planned.extend((None, [name]) for name in activation_absmax if name not in covered)
    if folded_only:
        planned = [(source, linears) for source, linears in planned if source is not None]
    plan = []
    fewest = 1 if static_symmetric is None else 2  # static measures on one half of the samples, fits on the other
    for source, linears in planned:
        weights = [modules[lin].weight for lin in linears]
        # Linears sharing an input saw the same activation: their maxima agree; take the max anyway.
        act = torch.stack([activation_absmax[lin].float() for lin in linears]).amax(dim=0)
        chosen: float | None = alpha
        samples = [activation_samples.get(lin) for lin in linears] if activation_samples else []
        if samples and all(sample is not None and sample.shape[0] >= fewest for sample in samples):
            candidates: list[float | None] = sorted({float(alpha), *alpha_candidates})
            # every candidate is compared with the same float outputs: computed once
            floats = [w.detach().float().to(x.device) for x, w in zip(samples, weights, strict=True)]
            outputs = [x @ w.t() for x, w in zip(samples, floats, strict=True)]
            if static_symmetric is None:
                errors = [
                    _int8_dynamic_error(samples, floats, smoothing_scales(act, weights, a), outputs, dynamic_asymmetric)
                    for a in candidates
                ]
            else:
                candidates.insert(0, None)
                errors = [_int8_static_error(samples, floats, a, static_symmetric, outputs) for a in candidates]
            chosen = candidates[errors.index(min(errors))]
        if chosen is None:
            continue  # unsmoothed is best: no scale, and no input multiplier to run
        plan.append(SmoothingGroup(source, linears, smoothing_scales(act, weights, chosen)))
    return plan


def _relative_error(approx: torch.Tensor, reference: torch.Tensor) -> float:
    return float((approx - reference).square().sum() / reference.square().sum().clamp(min=1e-30))


def _int8_weights(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``weight * scales`` fake-quantized per output channel, symmetric int8."""
    ws = weight * scales
    step = ws.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(ws / step) * step


def _int8_dynamic_error(
    samples: list[torch.Tensor],
    weights: list[torch.Tensor],
    scales: torch.Tensor,
    outputs: list[torch.Tensor],
    asymmetric: bool = False,
) -> float:
    """Relative squared output error of int8 dynamic (per-token activations, symmetric or
    ``asymmetric``, per-channel symmetric weights) of Linears ``weights [N_i, K]`` (fp32, on the
    samples' device) on their inputs ``samples [T, K]`` after smoothing with ``scales [K]``,
    summed over the Linears; ``outputs``: the float ``x @ w^T`` of each (the same for every
    candidate)."""
    total = 0.0
    for x, w, reference in zip(samples, weights, outputs, strict=True):
        s = scales.to(x.device)
        xs = x / s
        if asymmetric:  # the kernels' own quantizer: the search sees what will run
            codes, x_step, zero = quantize_per_token_asymmetric(xs)
            rounded = (codes.float() - zero) * x_step
        else:
            x_step = xs.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            rounded = torch.round(xs / x_step) * x_step
        total += _relative_error(rounded @ _int8_weights(w, s).t(), reference)
    return total


def _int8_static_error(
    samples: list[torch.Tensor],
    weights: list[torch.Tensor],
    alpha: float | None,
    symmetric: bool,
    outputs: list[torch.Tensor],
) -> float:
    """As :func:`_int8_dynamic_error` for static int8 smoothed at ``alpha`` (None: unsmoothed),
    two-fold: the scales (``alpha``'s, from the activation maxima) and the per-tensor activation
    range come from every other sample row, the error is measured on the rows in between, and
    the other way round.

    Measured in-sample the error misleads: a scale fitted to the calibration maxima evens out
    every channel's extreme, so the tensor's range sits at the calibration extremes of many
    channels at once and new inputs overshoot it (a random MLP on Gaussian inputs, 128
    calibration rows: alpha 0.8 measured 25% *less* error than none in-sample, 10x more on
    held-out rows, and 12 dB less SQNR once quantized)."""
    spec = INT8_SYMMETRIC if symmetric else INT8_ASYMMETRIC
    total = 0.0
    for fit, held in ((0, 1), (1, 0)):
        fitted = [x[fit::2] for x in samples]
        scales = torch.ones(samples[0].shape[1], device=samples[0].device)
        if alpha is not None:
            act = torch.stack([x.abs().amax(dim=0) for x in fitted]).amax(dim=0)
            scales = smoothing_scales(act, weights, alpha)
        for x_fit, x, w, reference in zip(fitted, samples, weights, outputs, strict=True):
            step, zero_point = choose_qparams((x_fit / scales).amin(), (x_fit / scales).amax(), spec)
            xq = (quantize(x[held::2] / scales, step, zero_point, spec).float() - zero_point) * step
            total += _relative_error(xq @ _int8_weights(w, scales).t(), reference[held::2])
    return total


@torch.no_grad()
def apply_smoothing(model: nn.Module, plan: list[SmoothingGroup]) -> dict[str, torch.Tensor]:
    """Apply ``plan`` to ``model`` **in place** (pass a copy): ``1 / s`` into each source,
    ``s`` into each Linear's weight columns. The float model's outputs are unchanged.

    Returns ``{linear name: s [K]}`` for the Linears whose scale has no source: their input
    must be divided by ``s`` at run time (fused into the activation quantization step).
    """
    modules = dict(model.named_modules())
    input_scales: dict[str, torch.Tensor] = {}
    for group in plan:
        if group.source is not None:
            source = modules[group.source]
            if isinstance(source, nn.Linear):  # output channel j of the source = input channel j
                scales = group.scales.to(device=source.weight.device, dtype=source.weight.dtype)
                source.weight.div_(scales.unsqueeze(1))
            elif _norm_like(source):
                scales = group.scales.to(device=source.weight.device, dtype=source.weight.dtype)
                source.weight.div_(scales)
            else:
                raise ConfigurationError(
                    f"smoothing source {group.source!r} is a {type(source).__name__}, not a norm or Linear",
                    suggestion="Build the plan with smoothing_plan() on this model.",
                )
            if getattr(source, "bias", None) is not None:
                source.bias.div_(scales)
        for name in group.linears:
            linear = modules[name]
            linear.weight.mul_(group.scales.to(device=linear.weight.device, dtype=linear.weight.dtype).unsqueeze(0))
            if group.source is None:
                input_scales[name] = group.scales.clone()
    return input_scales
