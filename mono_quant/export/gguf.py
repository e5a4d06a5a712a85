"""Export to GGUF: the file llama.cpp (and transformers' GGUF loader) loads.

``result.save("model.gguf", format="gguf", tokenizer=tok)`` writes one file with the
architecture metadata, the tokenizer and the tensors, through gguf-py (llama.cpp's own writer,
``gguf.GGUFWriter``). Load it with ``llama-server -m model.gguf`` (``--embedding`` for BERT), or
``AutoModelForCausalLM.from_pretrained(folder, gguf_file="/abs/path/model.gguf")``.

What each quantized tensor becomes (ggml's block layouts, 32 values per block, ``d`` and ``m``
stored as fp16; see gguf-py's ``quants.py``):

* int8 symmetric, per channel (or groups of a multiple of 32) -> ``Q8_0``: every 32-block of a
  row gets its channel's (group's) scale and the int8 values as they are.
* int4 symmetric (mono_quant's 1..15 with zero point 8) -> ``Q4_0`` (``(nibble - 8) * d``),
  the nibble being our value, ``d`` the group's scale repeated per 32-block.
* int4 asymmetric -> ``Q4_1`` (``nibble * d + m``) with ``m = -zero_point * scale``; float zero
  points (HQQ) fit too, since ``m`` is a float.
  Exact up to the fp16 rounding of ``d`` and ``m`` (relative 2^-11), when every group (also a
  partial last group) is a multiple of 32 wide.
* A quantized tensor with no exact ggml type (asymmetric int8, rows not a multiple of 32) is
  written as F32 of its dequantized weight
  (exact, 4 bytes per value) with a warning naming it; position / token-type embeddings are F32
  too (llama.cpp adds them as plain float rows).
* Float (unquantized) weights are written as they are (F32, or F16 for an fp16 model; bf16 as
  F32), norms and biases F32. A tied output head is not written when its weight equals the
  embedding's: llama.cpp then uses ``token_embd`` for the output; otherwise ``output.weight`` is.

Mixed precision (``layer_overrides``, ``max_accuracy_loss``): every tensor gets the type of its
own layer (an int4 g32 layer Q4_0 / Q4_1 next to g128 ones re-blocked to 32, int8 layers Q8_0,
float layers F32, fp16 layers F16); ``general.file_type`` names the most common type. An int4
group that is not a multiple of 32 (``int4-g16``) is refused, by pattern from the options and by
layer from the layer configs.

SmoothQuant input scales that could not be folded (``smoothed_input``) are refused: llama.cpp
has no per-channel input scale.

Architectures: ``llama`` (Q / K rows permuted the way llama.cpp's ``convert_hf_to_gguf.py``
``LlamaModel.permute`` does, byte-level BPE tokenizers) and ``bert`` (encoders such as MiniLM,
WordPiece tokenizer, mean or CLS pooling from the sentence-transformers config). Anything else,
fp16/bf16 casts, static activation quantization (GGUF has no activation scales: llama.cpp
quantizes activations itself), asymmetric int8 runs and int4 groups that are not a multiple of
32 raise ConfigurationError.

Example:
    >>> result = mono_quant.quantize(model, bits=4, scheme="symmetric", group_size=64)  # doctest: +SKIP
    >>> result.save("smollm2-q4_0.gguf", format="gguf", tokenizer=tok)                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mono_quant.errors import ConfigurationError
from mono_quant.export import ExportFormat, check_facts, override_precisions

__all__ = ["FORMAT", "check", "export", "ARCHITECTURES", "encode_q8_0", "encode_q4_0", "encode_q4_1"]

ARCHITECTURES = ("llama", "bert")
_BLOCK = 32
_SUPPORTED = (
    "int8 symmetric (dynamic or weight-only) -> Q8_0, int4 symmetric -> Q4_0, int4 asymmetric -> Q4_1 "
    "(group_size a multiple of 32)"
)
# convert_hf_to_gguf.py's get_vocab_base_pre(): the pre-tokenizer llama.cpp must apply is named
# by the hash of how the tokenizer splits this text (copied from llama.cpp, must stay verbatim).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
}
# HF tensors llama.cpp does not use (convert_hf_to_gguf.py drops them too).
_DROPPED = ("embeddings.position_ids", "pooler.", "rotary_emb.inv_freq", "cls.predictions", "cls.seq_relationship")


def _dropped(key: str) -> bool:
    return any(key.startswith(part) or f".{part}" in key for part in _DROPPED)


# -- check -----------------------------------------------------------------------------------
def check(info: Any = None, /, **facts: Any) -> None:
    """Raise ConfigurationError when GGUF cannot represent the quantization.

    ``info`` is the run's QuantizationInfo, or a dict (or keywords) with ``mode``
    ("dynamic" | "weight_only" | "static" | "cast"), ``bits``, ``symmetric``, ``group_size``
    and optionally ``architecture`` (a ``config.model_type``), or a QuantizeOptions, so a
    service can refuse a request before quantizing.

    Example:
        >>> check(mode="weight_only", bits=4, symmetric=True, group_size=128)
        >>> check(mode="weight_only", bits=4, symmetric=True, group_size=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigurationError: GGUF export needs int4 groups of a multiple of 32 values, ...
    """
    f = check_facts(info, facts)
    mode, bits, symmetric, group_size = f.get("mode"), f.get("bits"), f.get("symmetric", True), f.get("group_size")
    if mode is not None and str(mode).startswith("state_dict"):
        raise ConfigurationError(
            f"GGUF export needs the quantized nn.Module, but this run quantized a state_dict (mode {mode!r}): "
            "the file needs the model's architecture, config and tokenizer",
            suggestion="Quantize the transformers model object (quantize(model, ...)), then save it.",
        )
    if mode == "cast" or bits == 16:
        raise ConfigurationError(
            f"GGUF export writes integer-quantized models; mode {mode!r} (bits={bits}) is an fp16/bf16 cast",
            suggestion=f"Use one of: {_SUPPORTED}; for an F16 GGUF use llama.cpp's convert_hf_to_gguf.py "
            "--outtype f16 on the float model.",
        )
    if mode == "static":
        raise ConfigurationError(
            "GGUF export cannot represent static activation quantization: GGUF stores no activation scales "
            "(llama.cpp quantizes activations itself, per block of 32)",
            suggestion="Quantize with dynamic=True or weight_only=True (the weights are then written exactly as Q8_0).",
        )
    if mode not in (None, "dynamic", "weight_only"):
        raise ConfigurationError(f"GGUF export cannot represent mode {mode!r}", suggestion=f"Use {_SUPPORTED}.")
    if bits == 8 and symmetric is False:
        raise ConfigurationError(
            "GGUF export cannot represent asymmetric int8 weights: Q8_0 has a scale and no zero point",
            suggestion="Quantize int8 with scheme='symmetric' (the default) for Q8_0, or bits=4 asymmetric for Q4_1.",
        )
    if bits == 4 and group_size is not None and group_size % _BLOCK:
        raise ConfigurationError(
            f"GGUF export needs int4 groups of a multiple of 32 values, got group_size={group_size}: ggml's "
            "Q4_0 / Q4_1 blocks hold 32 values with one scale",
            suggestion="Quantize with group_size=32, 64 or 128.",
        )
    architecture = f.get("architecture")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise _unsupported_architecture(architecture)
    # Mixed precision (layer_overrides, max_accuracy_loss): each tensor gets its own ggml type,
    # so only an int4 group that 32-blocks cannot hold is refused, by pattern at submission and
    # by layer once quantized.
    for pattern, precision in override_precisions(f):
        if precision.bits == 4 and precision.group_size % _BLOCK:
            raise _group_not_blocks(f"layer_overrides {pattern!r}", precision.group_size)
    for name, layer in (f.get("layer_configs") or {}).items():
        if layer.get("smoothed_input"):
            raise _smoothed(name)
        if layer.get("bits") == 4 and layer.get("group_size") and layer["group_size"] % _BLOCK:
            raise _group_not_blocks(f"layer {name!r}", layer["group_size"])


def _group_not_blocks(where: str, group_size: int) -> ConfigurationError:
    return ConfigurationError(
        f"GGUF export needs int4 groups of a multiple of 32 values, but {where} asks for int4-g{group_size}: ggml's "
        "Q4_0 / Q4_1 blocks hold 32 values with one scale",
        suggestion="Use int4-g32 (or g64, g128) for that layer, or int8 (Q8_0).",
    )


def _smoothed(name: str) -> ConfigurationError:
    return ConfigurationError(
        f"layer {name!r} divides its input by a SmoothQuant scale that could not be folded into the layer before "
        "it; GGUF has no per-channel input scale, so llama.cpp would compute differently",
        suggestion="Quantize with smoothing=0 for a GGUF export (dynamic int8 smooths by default; llama.cpp "
        "quantizes activations itself, so smoothing brings it nothing; `monoquant quantize --format gguf` and the "
        "service's export_formats do so themselves).",
    )


def _unsupported_architecture(architecture: Any) -> ConfigurationError:
    return ConfigurationError(
        f"GGUF export does not support the {architecture!r} architecture yet (supported: {', '.join(ARCHITECTURES)}): "
        "each needs its own tensor names, metadata and tokenizer",
        suggestion="Export to compressed-tensors or ONNX instead, or convert the float model with llama.cpp's "
        "convert_hf_to_gguf.py.",
    )


# -- ggml block encodings ----------------------------------------------------------------------
def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """``[..., B]`` floats -> ``[..., B, 2]`` uint8, the fp16 little-endian bytes ggml stores."""
    half = values.to(torch.float16).contiguous()
    return half.view(torch.uint8).view(*half.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[N, B, 32]`` values 0..15 -> ``[N, B, 16]`` bytes: element j in the low nibble of byte j,
    element j + 16 in its high nibble (ggml's Q4 order, not pairwise)."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def encode_q8_0(q: torch.Tensor, block_scale: torch.Tensor) -> np.ndarray:
    """int8 ``q [N, K]`` and per-32-block scales ``[N, K / 32]`` -> Q8_0 bytes ``[N, K / 32 * 34]``.

    Example:
        >>> encode_q8_0(torch.ones(1, 32, dtype=torch.int8), torch.tensor([[0.5]])).shape
        (1, 34)
    """
    rows, cols = q.shape
    blocks = q.reshape(rows, cols // _BLOCK, _BLOCK).to(torch.int8).contiguous().view(torch.uint8)
    data = torch.cat([_fp16_bytes(block_scale), blocks], dim=-1)
    return data.reshape(rows, -1).numpy()


def encode_q4_0(q: torch.Tensor, block_scale: torch.Tensor) -> np.ndarray:
    """Unsigned int4 ``q [N, K]`` (1..15 on the symmetric grid, zero point 8) and per-block
    scales ``[N, K / 32]`` -> Q4_0 bytes ``[N, K / 32 * 18]``."""
    rows, cols = q.shape
    blocks = _nibbles(q.reshape(rows, cols // _BLOCK, _BLOCK))
    data = torch.cat([_fp16_bytes(block_scale), blocks], dim=-1)
    return data.reshape(rows, -1).numpy()


def encode_q4_1(q: torch.Tensor, block_scale: torch.Tensor, block_min: torch.Tensor) -> np.ndarray:
    """Unsigned int4 ``q [N, K]``, per-block scales and minimums ``[N, K / 32]`` (the minimum is
    ``-zero_point * scale``) -> Q4_1 bytes ``[N, K / 32 * 20]``."""
    rows, cols = q.shape
    blocks = _nibbles(q.reshape(rows, cols // _BLOCK, _BLOCK))
    data = torch.cat([_fp16_bytes(block_scale), _fp16_bytes(block_min), blocks], dim=-1)
    return data.reshape(rows, -1).numpy()


def _per_column(qparam: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Scales / zero points ``[N]`` or ``[N, ceil(K / g)]`` (partial last group allowed) -> ``[N, K]``."""
    if qparam.dim() == 1 or not group_size:
        return qparam.reshape(-1, 1).expand(-1, in_features)
    groups = math.ceil(in_features / group_size)
    widths = torch.full((groups,), group_size, dtype=torch.long)
    widths[-1] = in_features - (groups - 1) * group_size
    return torch.repeat_interleave(qparam, widths.to(qparam.device), dim=-1)


def _group_widths_fit(in_features: int, group_size: int | None) -> bool:
    if in_features % _BLOCK:
        return False
    return not group_size or group_size % _BLOCK == 0  # then the partial last group is too


def _dequantized(qt) -> torch.Tensor:
    group = getattr(qt.granularity, "group_size", None)
    cols = qt.qdata.shape[-1]
    q = qt.qdata.reshape(qt.qdata.shape[0], -1).float()
    scale = _per_column(qt.scale.float(), cols, group)
    if qt.zero_point is not None:
        q = q - _per_column(qt.zero_point.float(), cols, group)
    return (q * scale).reshape(qt.qdata.shape)


def _encode(name: str, qt, permute=None) -> tuple[np.ndarray, Any, str | None]:
    """``(data, ggml type, note)`` of one quantized weight; ``note`` says why it fell back to F32."""
    from gguf import GGMLQuantizationType as T

    q = qt.qdata.reshape(qt.qdata.shape[0], -1)
    rows, cols = q.shape
    group = getattr(qt.granularity, "group_size", None)
    scale = qt.scale.float()
    zp = qt.zero_point
    if permute is not None:  # rows move together with their qparams
        q, scale = permute(q), permute(scale)
        zp = None if zp is None else permute(zp)
    bits, symmetric = qt.spec.bits, qt.spec.symmetric
    note = None
    if qt.qdata.dim() != 2 or not _group_widths_fit(cols, group):
        note = f"{cols} values per row in groups of {group or cols} do not split into ggml's 32-value blocks"
    elif bits == 8 and (not symmetric or zp is not None and bool(zp.ne(0).any())):
        note = "asymmetric int8 has no ggml type (Q8_0 has no zero point)"
    if note is None:
        block_scale = _per_column(scale, cols, group)[:, ::_BLOCK]
        if bits == 8:
            return encode_q8_0(q, block_scale), T.Q8_0, None
        if symmetric:
            return encode_q4_0(q, block_scale), T.Q4_0, None
        block_zp = _per_column(zp.float(), cols, group)[:, ::_BLOCK]
        return encode_q4_1(q, block_scale, -block_zp * block_scale), T.Q4_1, None
    weight = _dequantized(type(qt)(q, scale, zp, qt.spec, qt.granularity) if permute else qt)
    return weight.float().numpy(), T.F32, note


# -- architectures -----------------------------------------------------------------------------
def _llama_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: HF's rotary halves -> llama.cpp's
    interleaved pairs, along the rows (qparams per row move with them)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, Mapping) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, Mapping) and scaling.get("rope_type", "default") != "default"):
        raise ConfigurationError(
            f"GGUF export supports llama models with plain RoPE, this one has rope_type {rope_type!r}",
            suggestion="Convert the float model with llama.cpp's convert_hf_to_gguf.py, "
            "or export to compressed-tensors.",
        )
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _llama_metadata(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigurationError(
            f"llama.cpp's llama graph uses SiLU, this model uses {config.hidden_act!r}",
            suggestion="Export to compressed-tensors instead.",
        )
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _bert_metadata(writer, config, source_dir: Path | None) -> None:
    import gguf

    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ConfigurationError(
            f"llama.cpp's BERT graph uses GELU, this model uses {config.hidden_act!r}",
            suggestion="Export to ONNX or compressed-tensors instead.",
        )
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_token_type_count(getattr(config, "type_vocab_size", 1) or 1)
    # sentence-transformers' pooling (convert_hf_to_gguf.py's _try_set_pooling_type); mean otherwise.
    pooling = gguf.PoolingType.MEAN
    if source_dir is not None and (source_dir / "1_Pooling" / "config.json").is_file():
        pooling_config = json.loads((source_dir / "1_Pooling" / "config.json").read_text())
        if pooling_config.get("pooling_mode_cls_token") and not pooling_config.get("pooling_mode_mean_tokens"):
            pooling = gguf.PoolingType.CLS
    writer.add_pooling_type(pooling)


# -- tokenizer -------------------------------------------------------------------------------
def _tokenizer_folder(tokenizer: Any, model: nn.Module, scratch: Path) -> Path:
    if tokenizer is None:
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if source and Path(str(source)).is_dir() and any(Path(str(source)).glob("tokenizer*")):
            return Path(str(source))
        raise ConfigurationError(
            "GGUF export embeds the tokenizer, and none was given or found next to the model",
            suggestion="Pass tokenizer= (the transformers tokenizer or its folder) to save().",
        )
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(scratch))
        return scratch
    folder = Path(os.fspath(tokenizer))
    if not folder.is_dir():
        raise ConfigurationError(
            f"tokenizer={tokenizer!r} is neither a tokenizer object nor a folder",
            suggestion="Pass the transformers tokenizer (AutoTokenizer.from_pretrained(...)) or its folder.",
        )
    return folder


def _vocab(hf_tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf.py's get_vocab_base(): tokens by id, added tokens typed CONTROL or
    USER_DEFINED, holes padded with [PAD{i}] (UNUSED) up to the model's vocab size."""
    import gguf

    reverse = {i: token for token, i in hf_tokenizer.get_vocab().items()}
    added = hf_tokenizer.get_added_vocab()
    decoder = hf_tokenizer.added_tokens_decoder
    size = max(vocab_size, len(reverse))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_tokenizer(writer, architecture: str, folder: Path, vocab_size: int, pre_tokenizer: str | None) -> None:
    import gguf
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer_json = folder / "tokenizer.json"
    model_type, byte_level = None, False
    if tokenizer_json.is_file():
        text = tokenizer_json.read_text(encoding="utf-8")
        model_type = json.loads(text).get("model", {}).get("type")
        byte_level = '"ByteLevel"' in text
    tokens, types = _vocab(hf_tokenizer, vocab_size)
    if architecture == "bert":
        if model_type not in (None, "WordPiece"):
            raise ConfigurationError(
                f"GGUF export of BERT models writes WordPiece vocabularies, this tokenizer is {model_type}",
                suggestion="Convert with llama.cpp's convert_hf_to_gguf.py, or export to ONNX.",
            )
        # convert_hf_to_gguf.py's BertModel.set_vocab: llama.cpp's WordPiece reads a phantom-space vocabulary.
        tokens = [
            t if kind == gguf.TokenType.CONTROL else (t[2:] if t.startswith("##") else "\u2581" + t)
            for t, kind in zip(tokens, types, strict=True)
        ]
        writer.add_tokenizer_model("bert")
        load_merges = False
    else:
        if model_type != "BPE" or not byte_level:
            raise ConfigurationError(
                f"GGUF export of llama models writes byte-level BPE vocabularies (GPT-2 style), this tokenizer is "
                f"{model_type or 'not a tokenizer.json'}",
                suggestion="Convert SentencePiece models with llama.cpp's convert_hf_to_gguf.py.",
            )
        writer.add_tokenizer_model("gpt2")
        load_merges = True
    if pre_tokenizer is None:
        digest = sha256(str(hf_tokenizer.encode(_CHKTXT)).encode()).hexdigest()
        pre_tokenizer = _PRE_TOKENIZERS.get(digest)
        if pre_tokenizer is None and architecture == "bert":
            pre_tokenizer = "default"  # llama.cpp's WordPiece does its own splitting
        if pre_tokenizer is None:
            raise ConfigurationError(
                f"GGUF export does not know this tokenizer's pre-tokenizer (hash {digest}): llama.cpp would "
                "split text differently from transformers",
                suggestion="Pass pre_tokenizer= (a llama.cpp name such as 'llama-bpe') to "
                "mono_quant.export.gguf.export, or convert with llama.cpp's convert_hf_to_gguf.py.",
            )
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# -- export ----------------------------------------------------------------------------------
def _float_weight(module: nn.Module) -> torch.Tensor | None:
    from mono_quant.modules import QuantizedModule

    if isinstance(module, QuantizedModule):
        return _dequantized(module.quantized_weight())
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach().float()


def _float_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.float16:
        return tensor.numpy()
    return tensor.float().numpy()  # fp32 as is, bf16 exactly widened


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    original: Any = None,
    info: Any = None,
    tokenizer: Any = None,
    sample_inputs: Any = None,
    pre_tokenizer: str | None = None,
) -> Path:
    """Write ``model`` (quantized by mono_quant) to the GGUF file ``path``; returns the path.

    ``tokenizer`` (a transformers tokenizer or a folder) is embedded; without one, the
    tokenizer files of the folder the model was loaded from are used. ``pre_tokenizer`` names
    llama.cpp's pre-tokenizer when the tokenizer is not one this module recognises.

    Example:
        >>> export(result.model, "model.gguf", tokenizer=tok)  # doctest: +SKIP
        PosixPath('model.gguf')
    """
    import gguf

    from mono_quant.modules import QuantizedEmbedding, QuantizedLinear, QuantizedModule

    del original, sample_inputs
    if info is not None:
        check(info)
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise ConfigurationError(
            f"GGUF export needs a transformers model (with .config), got {type(model).__name__}",
            suggestion="Quantize a model loaded with transformers, then save it.",
        )
    architecture = getattr(config, "model_type", None)
    if architecture not in ARCHITECTURES:
        raise _unsupported_architecture(architecture)
    arch_enum = gguf.MODEL_ARCH.LLAMA if architecture == "llama" else gguf.MODEL_ARCH.BERT
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)

    output_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    output_name = names.get(id(output_module)) if output_module is not None else None
    skip_output = False
    if output_module is not None and input_module is not None:
        out_w, in_w = _float_weight(output_module), _float_weight(input_module)
        skip_output = out_w is not None and out_w.shape == in_w.shape and torch.equal(out_w, in_w)

    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    def permutation(hf_name: str):
        if architecture != "llama":
            return None
        if hf_name.endswith("self_attn.q_proj"):
            return lambda t: _llama_permute(t, heads)
        if hf_name.endswith("self_attn.k_proj"):
            return lambda t: _llama_permute(t, kv_heads)
        return None

    def gguf_name(hf_key: str) -> str:
        mapped = name_map.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConfigurationError(
                f"GGUF export does not know where tensor {hf_key!r} of this {architecture} model goes in llama.cpp",
                suggestion="Export to compressed-tensors instead, or report the model so the mapping can be added.",
            )
        return mapped

    entries: list[tuple[str, np.ndarray, Any]] = []
    fallbacks: list[str] = []
    counts: dict[Any, int] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedModule):
            continue
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            raise ConfigurationError(
                f"GGUF export cannot represent layer {name!r} ({type(module).__name__})",
                suggestion=f"Exclude it from quantization (exclude=[{name!r}]).",
            )
        if getattr(module.config, "smoothed_input", False):
            raise _smoothed(name)
        handled.add(name)
        if (name == output_name and skip_output) or _dropped(f"{name}.weight"):
            continue
        target = gguf_name(f"{name}.weight")
        small_embedding = isinstance(module, QuantizedEmbedding) and module is not input_module
        if small_embedding:
            # position / token-type tables: llama.cpp adds them as float rows
            data, kind, note = _dequantized(module.quantized_weight()).numpy(), gguf.GGMLQuantizationType.F32, None
        else:
            data, kind, note = _encode(name, module.quantized_weight(), permutation(name))
        if note:
            fallbacks.append(f"{name} ({note})")
        counts[kind] = counts.get(kind, 0) + 1
        entries.append((target, data, kind))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            perm = permutation(name)
            bias = perm(bias.detach()) if perm else bias.detach()
            entries.append((gguf_name(f"{name}.bias"), bias.float().numpy(), gguf.GGMLQuantizationType.F32))
    if not counts:
        raise ConfigurationError(
            "GGUF export found no quantized layer to write",
            suggestion="Quantize the model (its Linear layers, the default) before exporting.",
        )

    prefixes = tuple(f"{n}." for n in handled)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or _dropped(key) or id(value) in seen:
            continue
        seen.add(id(value))
        module_name = key.rsplit(".", 1)[0]
        if output_name and module_name == output_name and skip_output:
            continue
        if not value.is_floating_point():
            raise ConfigurationError(
                f"GGUF export cannot place the non-float tensor {key!r} ({value.dtype})",
                suggestion="Export to compressed-tensors instead.",
            )
        perm = permutation(module_name)
        value = perm(value) if perm else value
        array = _float_array(value)
        kind = gguf.GGMLQuantizationType.F16 if array.dtype == np.float16 and value.dim() > 1 else None
        if array.dtype == np.float16 and value.dim() == 1:
            array = array.astype(np.float32)  # norms and biases in F32, as llama.cpp expects
        entries.append((gguf_name(key), array, kind))
    if fallbacks:
        warnings.warn(
            "GGUF export wrote these quantized weights as F32 of their dequantized values (exact, but 4 bytes "
            "per value): " + "; ".join(fallbacks),
            stacklevel=2,
        )

    types = gguf.GGMLQuantizationType
    file_type = {
        types.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
        types.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
        types.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    }.get(max(counts, key=lambda k: (k != types.F32, counts[k])), gguf.LlamaFileType.ALL_F32)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    source_dir = None
    source = getattr(model, "name_or_path", None)
    if source and Path(str(source)).is_dir():
        source_dir = Path(str(source))
    with tempfile.TemporaryDirectory(prefix="mono_quant_gguf_") as scratch:
        writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch_enum])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(str(getattr(config, "_name_or_path", "") or type(model).__name__))
            if architecture == "llama":
                _llama_metadata(writer, config)
            else:
                _bert_metadata(writer, config, source_dir)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            folder = _tokenizer_folder(tokenizer, model, Path(scratch))
            _write_tokenizer(writer, architecture, folder, config.vocab_size, pre_tokenizer)
            for target, data, kind in entries:
                writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


FORMAT = ExportFormat(
    name="gguf",
    artifact_name="model.gguf",
    consumers="llama.cpp (llama-server, llama-cli, llama-embedding) and transformers' GGUF loader",
    check=check,
    export=export,
    float_zero_points=True,
    input_scales=False,
    folded_smoothing=False,
)
