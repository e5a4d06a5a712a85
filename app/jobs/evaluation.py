"""Text for a job: tokenized, packed into sequences, split into calibration and eval; and the
accuracy figures of the report (what a worker computes besides quantizing).

Packing: every document of the upload (:func:`app.inputs.iter_text_documents`) is tokenized
without special tokens, the documents are joined with the tokenizer's end-of-sequence token
(when it has one) and the stream is cut into windows of ``seq_len - specials`` tokens, each
wrapped with the tokenizer's own special tokens (BERT's ``[CLS] ... [SEP]``; nothing for most
causal LMs). The last partial window is dropped unless it is the only one.

Held out: without an eval upload, the last :data:`HELD_OUT_FRACTION` of the calibration
windows (at least one, when there are two or more) are never calibrated on and are what the
report measures. Calibration then uses at most the library's sample count of the remaining
windows, chosen at random with the job's ``seed``.

Accuracy: perplexity before and after for causal LMs, mean-pooled embedding cosine for
encoders (like :func:`mono_quant.testing.embed`), and for every model the validation's output
SQNR / cosine on the same inputs (or the model's own ``dummy_inputs`` when there is no text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.inputs import iter_text_documents
from mono_quant.core.evaluation import is_causal_lm
from mono_quant.errors import InputError

__all__ = ["HELD_OUT_FRACTION", "TextWindows", "pack_text", "split_held_out", "choose_windows", "measure_accuracy"]

HELD_OUT_FRACTION = 0.1
_EVAL_BATCH = 4


@dataclass
class TextWindows:
    """Packed token windows ``[n, seq_len]`` of one text upload, and how they were made."""

    input_ids: torch.Tensor
    documents: int
    tokens: int
    seq_len: int
    notes: list[str] = field(default_factory=list)
    token_type_ids: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> TextWindows:
        return TextWindows(
            self.input_ids[index], self.documents, self.tokens, self.seq_len, self.notes, self.token_type_ids
        )

    def batch(self) -> dict[str, torch.Tensor]:
        """Keyword inputs of the model: ``input_ids``, ``attention_mask`` (all ones, no padding)
        and ``token_type_ids`` for tokenizers that use them."""
        inputs = {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}
        if self.token_type_ids:
            inputs["token_type_ids"] = torch.zeros_like(self.input_ids)
        return inputs

    def describe(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "seq_len": self.seq_len, "windows": len(self)}


def _max_positions(model: Any) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence (BERT: [CLS] / [SEP]), found by
    tokenizing a probe with and without them (transformers 5 has no public template call)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _takes(model: Any, name: str) -> bool:
    """Whether the model's forward takes keyword ``name`` (a tokenizer may make inputs the
    model has no use for: BERT's token_type_ids for a Llama)."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def pack_text(path: Path, text_format: str, filename: str, tokenizer: Any, seq_len: int, model: Any) -> TextWindows:
    """Tokenize a text upload and pack it into windows of ``seq_len`` tokens (capped at the
    model's ``max_position_embeddings``). Raises InputError when the text has no tokens."""
    notes = []
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        notes.append(f"seq_len={seq_len} is above the model's max_position_embeddings; used {limit}")
        seq_len = limit
    prefix, suffix = _special_tokens(tokenizer)
    specials = len(prefix) + len(suffix)
    content = seq_len - specials
    if content < 2:
        raise InputError(
            f"seq_len={seq_len} leaves no room for text next to the tokenizer's {specials} special tokens",
            suggestion="Use a larger seq_len (the default is 512).",
        )
    separator = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    stream: list[int] = []
    documents = 0
    for document in iter_text_documents(path, text_format, filename):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if ids:
            if stream:
                stream.extend(separator)
            stream.extend(ids)
            documents += 1
    if len(stream) < 2:
        raise InputError(
            f"{filename} gives fewer than 2 tokens with the model's tokenizer",
            suggestion="Send more text (calibration wants a few hundred thousand tokens; a few thousand work).",
        )
    windows = [stream[start : start + content] for start in range(0, len(stream) - content + 1, content)]
    if not windows:
        windows = [stream]
        notes.append(f"the text has {len(stream)} tokens, fewer than seq_len={seq_len}: one shorter sequence")
    wrapped = [prefix + window + suffix for window in windows]
    uses_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ()) and _takes(model, "token_type_ids")
    return TextWindows(
        torch.tensor(wrapped, dtype=torch.long), documents, len(stream), len(wrapped[0]), notes, uses_types
    )


def split_held_out(windows: TextWindows) -> tuple[TextWindows, TextWindows | None]:
    """``(calibration, held out)``: the last :data:`HELD_OUT_FRACTION` of the windows (at least
    one) are held out; a single window cannot be split (None)."""
    n = len(windows)
    if n < 2:
        return windows, None
    held = max(1, int(n * HELD_OUT_FRACTION))
    return windows.rows(slice(0, n - held)), windows.rows(slice(n - held, n))


def choose_windows(windows: TextWindows, count: int, seed: int) -> TextWindows:
    """At most ``count`` windows, chosen at random with ``seed`` (kept in text order)."""
    if len(windows) <= count:
        return windows
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(windows), generator=generator)[:count].sort().values
    return windows.rows(chosen)


def _device_of(model: Any) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.inference_mode()
def _embeddings(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    from mono_quant.testing import embed

    pieces = []
    for start in range(0, batch["input_ids"].shape[0], _EVAL_BATCH):
        rows = {name: tensor[start : start + _EVAL_BATCH] for name, tensor in batch.items()}
        try:
            pieces.append(embed(model, rows))
        except AttributeError:  # no last_hidden_state: not an encoder
            return None
    return torch.cat(pieces)


def measure_accuracy(original: Any, quantized: Any, windows: TextWindows) -> dict[str, Any]:
    """Accuracy on ``windows``: perplexity before/after (causal LMs) or embedding cosine
    (models with a ``last_hidden_state``). Empty for other models (their output SQNR comes
    from the validation)."""
    from mono_quant.testing import cosine_stats, perplexity

    device = _device_of(quantized)
    if is_causal_lm(original):
        ids = windows.input_ids.to(device)
        before = perplexity(original, ids, batch_size=_EVAL_BATCH)
        after = perplexity(quantized, ids, batch_size=_EVAL_BATCH)
        return {
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_change_pct": 100.0 * (after - before) / before,
        }
    batch = {name: tensor.to(device) for name, tensor in windows.batch().items()}
    reference = _embeddings(original, batch)
    if reference is None:
        return {}
    stats = cosine_stats(reference, _embeddings(quantized, batch))
    return {"embedding_cosine_mean": stats["mean"], "embedding_cosine_min": stats["min"]}
