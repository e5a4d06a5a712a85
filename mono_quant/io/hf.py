"""Hugging Face model folders (``config.json`` + safetensors weights) as runnable modules.

Built with ``transformers`` (an optional dependency) from the config alone: no remote code,
no hub access. Weights are loaded with the safe loaders of :mod:`mono_quant.io.handlers`.
A causal LM (``architectures`` ending in ``ForCausalLM``, or ``is_decoder``) is built with its
output head (``AutoModelForCausalLM``: logits, tied embeddings), anything else as the base
model (``AutoModel``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mono_quant.core.evaluation import is_causal_lm_config
from mono_quant.errors import InputError
from mono_quant.io.handlers import load_state_dict_file

__all__ = ["is_hf_folder", "is_causal_lm_config", "load_hf_folder", "load_hf_tokenizer", "load_calibration_file"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_folder(path: str | os.PathLike, trusted: bool = False) -> nn.Module:
    """Build the model described by ``config.json`` and load its weights (eval mode).

    Sharded checkpoints (``model-00001-of-0000N.safetensors``) are loaded shard by shard.
    """
    path = Path(path)
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:
        raise InputError(
            "loading a Hugging Face model folder needs the 'transformers' package",
            suggestion="pip install 'mono-quant[hf]', or upload a safetensors state_dict instead.",
        ) from None
    try:
        config_data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"config.json is unreadable: {exc}", suggestion="Fix or re-export config.json.") from None
    if config_data.get("auto_map"):
        raise InputError(
            "this model needs custom remote code (config.json has auto_map), which is never run",
            suggestion="Use a model architecture that ships with transformers, or upload a state_dict.",
        )
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        auto_class = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
        model = auto_class.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise InputError(
            f"cannot build a model from config.json: {type(exc).__name__}: {str(exc)[:300]}",
            suggestion="Check model_type in config.json; it must be an architecture transformers knows.",
        ) from None
    files = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    files = files[:1] or sorted(path.glob("model-*-of-*.safetensors"))
    if not files:
        raise InputError(
            f"no weights next to config.json in {path.name}",
            suggestion="Include model.safetensors (or sharded model-0000x-of-0000N.safetensors).",
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        loaded = load_state_dict_file(file, trusted=trusted)
        if isinstance(loaded, nn.Module):
            loaded = loaded.state_dict()
        state.update(loaded)
    expected = set(model.state_dict())
    # Checkpoints of a base model often carry the architecture's prefix ("bert.") or not.
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not expected & set(state) and any(k.startswith(prefix + ".") for k in state):
        state = {k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if len(missing) > len(expected) // 2:
        raise InputError(
            f"the weights do not fit the config: {len(missing)} of {len(expected)} tensors missing "
            f"(e.g. {missing[:3]})",
            suggestion="Upload the weights that belong to this config.json.",
        )
    return model.eval()


def load_hf_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model folder (``tokenizer.json``, vocab files...), or None when
    the folder has none. Offline, no remote code.

    Example:
        >>> tokenizer = load_hf_tokenizer("SmolLM2-135M/")  # doctest: +SKIP
    """
    path = Path(path)
    vocabulary = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
    if not any((path / name).is_file() for name in vocabulary):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot load the tokenizer saved with the model: {type(exc).__name__}: {str(exc)[:300]}",
            suggestion="Save the tokenizer with tokenizer.save_pretrained(folder) next to config.json.",
        ) from None


def load_calibration_file(path: str | os.PathLike) -> torch.Tensor | dict[str, torch.Tensor]:
    """Calibration inputs from a safetensors / weights-only .pt file of tensors.

    One tensor -> that tensor (``model(x)``); several (``input_ids``, ``attention_mask``...)
    -> a dict of keyword inputs whose first dimension indexes samples.
    """
    loaded = load_state_dict_file(path)
    if isinstance(loaded, nn.Module) or not loaded:
        raise InputError("calibration file holds no tensors", suggestion="Save a dict of input tensors.")
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    rows = {t.shape[0] if t.dim() else 0 for t in loaded.values()}
    if len(rows) != 1:
        raise InputError(
            f"calibration tensors disagree on the number of samples: {sorted(rows)}",
            suggestion="Give every input tensor the same first dimension (one row per sample).",
        )
    return loaded
