"""Residual-stream rotation: an orthogonal change of basis folded into a pre-norm decoder's weights.

After QuaRot (Ashkboos et al., 2024, "Outlier-Free 4-bit Inference in Rotated LLMs") and SpinQuant
(Liu et al., 2024), offline part only. In a pre-norm decoder (Llama, Mistral, Qwen2...) every
layer reads the residual stream ``h`` through an RMSNorm and writes back into it through
``o_proj`` and ``down_proj``. For an orthogonal ``Q`` (``Q Q^T = I``):

* ``RMSNorm(h Q) = RMSNorm(h) Q`` once the norm's weight is folded into the Linears that read it
  (``rms`` is a vector norm, which rotations keep);
* a reader ``y = x W^T`` becomes ``(x Q)(W Q)^T``: its weight ``W Q``;
* a writer (and the token embedding) writes ``y Q``: its weight ``Q^T W`` (embedding rows ``E Q``,
  biases ``b Q``).

So the whole model computes the same function with every residual reader's input in the rotated
basis, where the few huge channels an LLM's hidden state has are spread over all channels: per-token
int8 activations lose far less (SmolLM2-135M, int8 dynamic with calibration data, 8 held-out
windows: +1.19% perplexity without, +0.42% to +1.17% with, mean +0.81% over five rotations; see
bench/RESULTS.md). Nothing is added at run time, so every format and consumer loads the result as
the plain architecture it is.

Costs and limits:

* A tied output head is untied: the embedding needs ``E Q`` and the head ``E diag(w) Q`` (``w`` the
  final norm's weight), which are different matrices. For SmolLM2-135M that is 28 M more weights
  (int8: +28 MB on ~135 MB).
* Only what the rotation was checked on: every decoder layer has ``input_layernorm`` and
  ``post_attention_layernorm`` norms that commute with rotations (probed numerically: LayerNorm's
  mean subtraction does not, Gemma's ``1 + w`` gain is folded as what the norm computes), writers
  named ``o_proj`` / ``down_proj``, and the model's output equals the original's on random tokens
  afterwards. Anything else is refused with :class:`~mono_quant.errors.ConfigurationError`.
* The attention's value/output pair and the FFN's inner activations are not rotated (QuaRot's online
  Hadamard transforms need a run-time op): measured, a per-head rotation of V/O folded offline made
  SmolLM2 worse (+0.9% -> +1.8%, fake-quantized).
"""

from __future__ import annotations

import torch
from torch import nn

from mono_quant.errors import ConfigurationError

__all__ = ["random_orthogonal", "rotate_residual_stream", "tied_output_head", "ROTATION_SEED"]

# The rotation is a seeded random orthogonal matrix (QR of a Gaussian, signs fixed). Measured on
# SmolLM2 (fake-quantized int8 dynamic, 8 windows): random orthogonal +0.54..+0.91%, random-sign
# Hadamard (Sylvester x Paley, 576 = 36 x 16) +0.34..+1.57%: no better here, and orthogonal exists
# for every size.
ROTATION_SEED = 0
# Matrices up to this size are built and applied in float64 (exact to fp32's last bit); above,
# in float32 (a 4096-wide model's weights would take minutes in float64 on a small CPU).
_FLOAT64_MAX_SIZE = 2048
_WRITERS = ("o_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
# Relative error of the rotated model's logits allowed against the original's (float32 rounding).
_EQUIVALENCE_TOLERANCE = 1e-3


def random_orthogonal(size: int, seed: int = ROTATION_SEED, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A ``[size, size]`` orthogonal matrix drawn uniformly (Haar) from a seeded generator.

    Example:
        >>> q = random_orthogonal(8, seed=0)
        >>> torch.allclose(q @ q.T, torch.eye(8, dtype=q.dtype))
        True
    """
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None]).to(dtype)


def tied_output_head(model: nn.Module) -> nn.Linear | None:
    """The model's Linear output head when it shares its weight with the token embedding
    (what the rotation unties), else None."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight:
        return head
    return None


def _refuse(model: nn.Module, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"rotation cannot be applied to {type(model).__name__}: {why}",
        suggestion="rotation works on pre-norm decoders with RMSNorm (Llama, Mistral, Qwen2 and alike, as "
        "transformers builds them); drop rotation for this model.",
    )


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Module) for n in _NORMS)]
    if not layers:
        raise _refuse(model, "it has no decoder layers with input_layernorm and post_attention_layernorm")
    for layer in layers:
        for part in ("self_attn", "mlp"):
            if not isinstance(getattr(layer, part, None), nn.Module):
                raise _refuse(model, f"a decoder layer has no {part}")
    return layers


def _readers_and_writers(model: nn.Module, block: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """The Linears of an attention or FFN block reading the normed residual, and the one writing
    back (``o_proj`` / ``down_proj``)."""
    linears = {name: m for name, m in block.named_children() if isinstance(m, nn.Linear)}
    writers = [linears.pop(name) for name in _WRITERS if name in linears]
    if len(writers) != 1 or not linears:
        raise _refuse(model, f"{type(block).__name__} does not have one of {_WRITERS} and the Linears it reads")
    return list(linears.values()), writers[0]


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module) or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise _refuse(model, "its decoder has no final norm (.norm) before the output head")
    return norm


@torch.no_grad()
def _fold_norm(model: nn.Module, norm: nn.Module, readers: list[nn.Linear], size: int) -> None:
    """Fold the gain ``norm`` multiplies by into ``readers`` and leave the norm a plain
    ``x / rms(x)``. The gain is measured, not read from the weight (Llama's ``w``, Gemma's
    ``1 + w``); a norm that is not a gain times ``x / rms(x)`` (LayerNorm subtracts the mean) is
    refused."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,) or getattr(norm, "bias", None) is not None:
        raise _refuse(model, f"{type(norm).__name__} is not an RMSNorm over the hidden size {size}")
    tolerance = max(1e-3, 8 * torch.finfo(weight.dtype).eps)
    probe = torch.randn(4, size, generator=torch.Generator().manual_seed(0)).to(weight)
    unit = probe / probe.float().pow(2).mean(-1, keepdim=True).sqrt().to(weight)

    def is_unit() -> bool:
        return torch.allclose(norm(probe).float(), unit.float(), rtol=tolerance, atol=tolerance)

    gain = (norm(probe).float() / unit.float()).median(dim=0).values
    for reader in readers:
        reader.weight.copy_((reader.weight.double() * gain.double()[None]).to(reader.weight.dtype))
    for neutral in (1.0, 0.0):  # w, then 1 + w
        weight.fill_(neutral)
        if is_unit():
            return
    raise _refuse(model, f"{type(norm).__name__} is not a gain times x / rms(x) (LayerNorm subtracts the mean)")


@torch.no_grad()
def rotate_residual_stream(model: nn.Module, seed: int = ROTATION_SEED) -> nn.Module:
    """Rotate ``model``'s residual stream in place (see the module docstring) and return it.

    The caller passes its own working copy. A tied output head is untied (``tie_word_embeddings``
    set False in the model's config). Raises ConfigurationError for a model this does not apply
    to (before changing it), or whose output changed (the check runs the model on 2 x 8 random
    tokens before and after; the copy is then half-rotated: discard it).
    """
    from mono_quant.core.algorithms.smoothing import synthetic_token_batches

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
        raise _refuse(model, "it has no token embedding and Linear output head")
    layers = _decoder_layers(model)
    final_norm = _final_norm(model)
    size = embedding.embedding_dim
    blocks = []
    for layer in layers:  # the structure first: nothing runs or changes on a model refused
        attn_readers, attn_writer = _readers_and_writers(model, layer.self_attn)
        ffn_readers, ffn_writer = _readers_and_writers(model, layer.mlp)
        blocks.append((layer, attn_readers, ffn_readers, [attn_writer, ffn_writer]))
    batch = synthetic_token_batches(model, batches=1, rows=2, length=8)[0]
    reference = _logits(model, batch)

    if tied_output_head(model) is not None:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        config = getattr(model, "config", None)
        if config is not None:
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            for cfg in {id(config): config, id(text_config): text_config}.values():
                cfg.tie_word_embeddings = False
    for layer, attn_readers, ffn_readers, _ in blocks:
        _fold_norm(model, layer.input_layernorm, attn_readers, size)
        _fold_norm(model, layer.post_attention_layernorm, ffn_readers, size)
    _fold_norm(model, final_norm, [head], size)

    dtype = torch.float64 if size <= _FLOAT64_MAX_SIZE else torch.float32
    rotation = random_orthogonal(size, seed, dtype)

    def right(tensor: torch.Tensor) -> None:  # rows @ Q: readers' weights, embedding rows, biases
        tensor.copy_((tensor.to(dtype) @ rotation.to(tensor.device)).to(tensor.dtype))

    right(embedding.weight)
    right(head.weight)
    for _, attn_readers, ffn_readers, writers in blocks:
        for reader in attn_readers + ffn_readers:
            right(reader.weight)
        for writer in writers:
            writer.weight.copy_((rotation.T.to(writer.weight.device) @ writer.weight.to(dtype)).to(writer.weight.dtype))
            if writer.bias is not None:
                right(writer.bias)

    rotated = _logits(model, batch)
    error = ((rotated - reference).norm() / reference.norm().clamp(min=1e-12)).item()
    if not error <= _EQUIVALENCE_TOLERANCE:
        raise _refuse(model, f"the rotated model's output differs from the original's (relative error {error:.2e})")
    return model


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    return logits.detach().float().cpu()
