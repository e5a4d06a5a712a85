"""quantize_file: tensor-by-tensor quantization of a safetensors file, written atomically."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

from mono_quant import (
    ConfigurationError,
    InputError,
    load_model,
    load_quantized,
    quantize,
    quantize_file,
    read_metadata,
)
from mono_quant.io import formats

from .conftest import build, inputs


class EmbedMLP(nn.Module):
    """An embedding table (named so that the streaming plan keeps it int8) and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 128)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens).mean(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return EmbedMLP().eval()


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_model().state_dict(), path, metadata={"origin": "test"})
    return path


STREAM_MODES = {
    "int8-dynamic": ({"bits": 8}, {"bits": 8, "dynamic": True}),
    "int8-weight-only": ({"bits": 8, "weight_only": True}, {"bits": 8, "weight_only": True}),
    "int4": ({"bits": 4}, {"bits": 4}),
    "int4-g32-sym-exclude": (
        {"bits": 4, "group_size": 32, "scheme": "symmetric", "exclude": ["head"]},
        {"bits": 4, "group_size": 32, "scheme": "symmetric", "exclude": ["head"]},
    ),
    "fp16": ({"bits": 16}, {"bits": 16}),
    "bf16": ({"bits": 16, "dtype": "bf16"}, {"bits": 16, "dtype": "bf16"}),
}


@pytest.mark.parametrize(("file_kwargs", "memory_kwargs"), list(STREAM_MODES.values()), ids=list(STREAM_MODES))
def test_streamed_file_matches_in_memory_quantize_bitwise(tmp_path, source, file_kwargs, memory_kwargs):
    out = quantize_file(source, tmp_path / "out.safetensors", **file_kwargs)
    in_memory = quantize(load_model(source), **memory_kwargs)

    streamed = load_model(out)
    assert streamed.keys() == in_memory.model.keys()
    for name, tensor in in_memory.model.items():
        assert streamed[name].dtype == tensor.dtype, name
        assert torch.equal(streamed[name], tensor), name
    assert read_metadata(out)["layers"] == in_memory.layers

    # both load into a skeleton and compute the same thing
    tokens = torch.randint(0, 100, (4, 6))
    from_file = load_quantized(out, _model(seed=3))
    from_memory = load_quantized(in_memory.save(tmp_path / "mem.safetensors"), _model(seed=4))
    with torch.inference_mode():
        assert torch.equal(from_file(tokens), from_memory(tokens))


def test_streamed_file_layout_and_metadata(tmp_path, source):
    out = quantize_file(source, tmp_path / "out.safetensors", bits=4)
    state = load_model(out)
    assert state["embed_tokens.qweight"].dtype is torch.int8  # embeddings stay int8
    assert state["fc1.qweight"].dtype is torch.uint8  # packed int4
    assert state["fc1.weight_scale"].shape == (128, 1)
    assert state["head.weight_scale"].shape[1] == 1  # in_features=64 < group 128: one (partial) group
    meta = read_metadata(out)
    assert meta["format"] == "mono_quant"
    assert meta["quantization_info"]["source_metadata"] == {"origin": "test"}
    assert meta["layers"]["fc1"]["kind"] == "auto"
    assert meta["quantization_info"]["skip_reasons"] == {}  # in_features=64 < 128: one partial group
    assert out.stat().st_size < 0.3 * source.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out.safetensors"]


def test_streamed_mlp_loads_and_computes(tmp_path):
    source = tmp_path / "mlp.safetensors"
    safetensors.torch.save_file(build("mlp").state_dict(), source)
    out = quantize_file(source, tmp_path / "mlp-int8.safetensors", bits=8)
    expected = quantize(build("mlp"), bits=8, dynamic=True).model
    restored = load_quantized(out, build("mlp", seed=11))
    x = inputs("mlp")
    with torch.inference_mode():
        assert torch.equal(restored(x), expected(x))


def test_progress_callback(tmp_path, source):
    events = []
    quantize_file(source, tmp_path / "out.safetensors", bits=8, progress_callback=lambda *e: events.append(e))
    assert events[0] == ("quantize", 0.0)
    assert events[-1] == ("quantize", 1.0)
    assert [f for _, f in events] == sorted(f for _, f in events)


def test_truncated_input_is_an_input_error_and_leaves_no_output(tmp_path, source):
    raw = source.read_bytes()
    source.write_bytes(raw[:-1000])
    target = tmp_path / "out.safetensors"
    with pytest.raises(InputError) as excinfo:
        quantize_file(source, target, bits=8)
    assert excinfo.value.message.startswith("model.safetensors is not a valid safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_data_shorter_than_the_header_says_leaves_no_output(tmp_path, source, monkeypatch):
    # The header check passed, then the file shrank (it is read tensor by tensor): the
    # streaming loop itself must notice and leave nothing behind.
    real_check = formats.read_safetensors_header

    def check_then_truncate(path):
        result = real_check(path)
        data = path.read_bytes()
        path.write_bytes(data[:-1000])
        return result

    monkeypatch.setattr(formats, "read_safetensors_header", check_then_truncate)
    target = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match="is truncated"):
        quantize_file(source, target, bits=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_failure_mid_stream_keeps_an_existing_output(tmp_path, source, monkeypatch):
    target = tmp_path / "out.safetensors"
    quantize_file(source, target, bits=8)
    before = target.read_bytes()

    real_convert = formats.convert_tensor
    calls = []

    def convert_then_fail(plan, name, tensor, done=None):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real_convert(plan, name, tensor, done)

    monkeypatch.setattr(formats, "convert_tensor", convert_then_fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        quantize_file(source, target, bits=4)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out.safetensors"]


def test_a_dtype_torch_cannot_load_is_an_input_error(tmp_path):
    source = tmp_path / "odd.safetensors"
    header = json.dumps({"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    source.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(InputError, match="tensor 'w' has dtype U16, which torch cannot load"):
        quantize_file(source, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "bits=5 is not supported"),
        ({"scheme": "affine"}, "scheme='affine' is not supported"),
        ({"bits": 16, "dtype": "int8"}, "dtype='int8' is not supported"),
    ],
    ids=["bits", "scheme", "dtype"],
)
def test_invalid_arguments(tmp_path, source, kwargs, message):
    with pytest.raises(ConfigurationError) as excinfo:
        quantize_file(source, tmp_path / "out.safetensors", **kwargs)
    assert excinfo.value.message == message
    assert excinfo.value.suggestion
    assert not (tmp_path / "out.safetensors").exists()


def test_refuses_non_safetensors_input(tmp_path):
    source = tmp_path / "model.pt"
    torch.save(build("mlp").state_dict(), source)
    with pytest.raises(InputError, match="not a valid safetensors file"):
        quantize_file(source, tmp_path / "out.safetensors")
