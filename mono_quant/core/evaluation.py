"""How close a quantized model stays to its float original, measured on data: the metric of
the accuracy target (``quantize(max_accuracy_loss=...)``) and of the service's report.

* Causal language models (``...ForCausalLM``, or a config that says ``is_decoder``):
  perplexity of the next token over the eval batches; the loss is the relative increase,
  ``ppl_quantized / ppl_float - 1``.
* Models whose output has a ``last_hidden_state`` and whose inputs an ``attention_mask``
  (encoders): cosine of the mean-pooled, normalised embeddings (sentence-transformers'
  pooling), averaged over the rows; the loss is ``1 - cosine``.
* Any other model: cosine of each row's flattened first floating output (``logits``, a tensor,
  the first tensor of a tuple); the loss is ``1 - cosine``.

Batches are what calibration takes (a tensor, a tuple, a dict of keyword inputs; see
``core/calibration``). For perplexity a batch must carry the token ids: a tensor of ids, or
a dict with ``input_ids`` (positions where ``attention_mask`` is 0 are not scored).

Example:
    >>> evaluator = Evaluator(model, eval_batches)  # doctest: +SKIP
    >>> evaluator.metric, evaluator.loss(quantized_model)  # doctest: +SKIP
    ('perplexity', 0.0123)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mono_quant.core.calibration import run_batch
from mono_quant.errors import InputError

__all__ = [
    "Evaluator",
    "first_float_output",
    "is_causal_lm",
    "is_causal_lm_config",
    "mean_pooled",
    "perplexity",
    "METRICS",
]

METRICS = ("perplexity", "embedding_cosine", "output_cosine")


def is_causal_lm_config(config: Any) -> bool:
    """Whether a transformers config describes a causal LM (next-token logits)."""
    architectures = getattr(config, "architectures", None) or []
    return any(str(name).endswith("ForCausalLM") for name in architectures) or bool(
        getattr(config, "is_decoder", False)
    )


def is_causal_lm(model: Any) -> bool:
    """A model built with a language-model head (``...ForCausalLM``): next-token logits."""
    return type(model).__name__.endswith("ForCausalLM") or (
        hasattr(model, "config") and is_causal_lm_config(model.config) and hasattr(model, "get_output_embeddings")
    )


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _token_ids(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    raise InputError(
        f"a perplexity batch must carry token ids, got {type(batch).__name__}",
        suggestion="Give eval batches as tensors of token ids [batch, tokens] or dicts with 'input_ids'.",
    )


@torch.inference_mode()
def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """Next-token perplexity of a causal LM over ``batches`` (each sequence scored on its own).

    Example:
        >>> perplexity(model, [ids[:4], ids[4:8]])  # doctest: +SKIP
        14.43
    """
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        ids, mask = _token_ids(batch)
        logits = run_batch(model, batch, device).logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        if mask is not None:
            keep = mask[:, 1:].reshape(-1).to(nll.device).bool()
            nll = nll[keep]
        total_nll += float(nll.sum())
        total_tokens += nll.numel()
    if total_tokens == 0:
        raise InputError(
            "the eval batches have no token to score (sequences need 2+ tokens)",
            suggestion="Give eval sequences of at least 2 tokens (512 is typical).",
        )
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings ``[N, H]`` of ``hidden [N, T, H]`` over the
    positions ``attention_mask [N, T]`` keeps."""
    mask = attention_mask.unsqueeze(-1).to(device=hidden.device, dtype=torch.float32)
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return nn.functional.normalize(pooled, dim=-1)


def first_float_output(output: Any) -> torch.Tensor | None:
    """The tensor a model's output is compared by: ``logits``, ``last_hidden_state``, the output
    itself when it is a floating tensor, or the first floating tensor of a tuple / dict."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in map(first_float_output, values) if v is not None), None)


class Evaluator:
    """The float model's figures on ``batches``, computed once, and the loss of another model
    against them (:meth:`loss`): what the accuracy-target search calls once per trial."""

    def __init__(self, reference: nn.Module, batches: list[Any]) -> None:
        if not batches:
            raise InputError("no eval batches", suggestion="Pass eval_data with at least one batch.")
        self.batches = batches
        self.metric = "perplexity" if is_causal_lm(reference) else None
        self._reference: list[torch.Tensor] = []
        if self.metric == "perplexity":
            self.baseline = perplexity(reference, batches)
            return
        self.baseline = 1.0
        self._reference = self._outputs(reference)
        if self.metric is None:  # set by _outputs from what the model returns
            raise InputError(
                "the model's output on the eval batches holds no floating tensor to compare",
                suggestion="Give eval_data the model runs on; its output must contain a float tensor.",
            )

    @torch.inference_mode()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        device = _device(model)
        outputs = []
        for batch in self.batches:
            output = run_batch(model, batch, device)
            hidden = getattr(output, "last_hidden_state", None)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            if isinstance(hidden, torch.Tensor) and isinstance(mask, torch.Tensor) and hidden.dim() == 3:
                self.metric = self.metric or "embedding_cosine"
                outputs.append(mean_pooled(hidden, mask).cpu())
                continue
            tensor = first_float_output(output)
            if tensor is None:
                return []
            self.metric = self.metric or "output_cosine"
            outputs.append(tensor.detach().float().reshape(tensor.shape[0] if tensor.dim() else 1, -1).cpu())
        return outputs

    def value(self, model: nn.Module) -> float:
        """Perplexity, or the mean cosine to the float model's outputs."""
        if self.metric == "perplexity":
            return perplexity(model, self.batches)
        candidate = self._outputs(model)
        cosines = [
            nn.functional.cosine_similarity(ref, out, dim=-1)
            for ref, out in zip(self._reference, candidate, strict=True)
        ]
        return float(torch.cat(cosines).mean())

    def loss_of(self, value: float) -> float:
        """The relative loss of a metric value: perplexity increase, or ``1 - cosine``."""
        if self.metric == "perplexity":
            return value / self.baseline - 1.0
        return 1.0 - value

    def loss(self, model: nn.Module) -> float:
        return self.loss_of(self.value(model))
