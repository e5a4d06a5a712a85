"""save_model / load_quantized / read_metadata: real low-bit files that restore bit-exactly."""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import mono_quant
from mono_quant import InputError, load_model, load_quantized, quantize, read_metadata, save_model
from mono_quant.io.formats import FORMAT_NAME, FORMAT_VERSION
from mono_quant.modules import QuantizedModule

from .conftest import build, inputs

MODES = {
    "int8-dynamic": {"bits": 8, "dynamic": True},
    "int8-weight-only": {"bits": 8, "weight_only": True},
    "int8-static": {"bits": 8},
    "int4": {"bits": 4, "group_size": 32},
    "fp16": {"bits": 16},
    "bf16": {"bits": 16, "dtype": "bf16"},
}


def _quantize(kind: str, mode: str):
    kwargs = dict(MODES[mode])
    if mode == "int8-static":
        kwargs["calibration_data"] = inputs(kind, n=64, seed=5)
    result = quantize(build(kind), **kwargs)
    assert result, result.errors
    return result


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm"])
def test_save_and_load_quantized_is_bit_exact(tmp_path, kind, mode):
    result = _quantize(kind, mode)
    x = inputs(kind)
    path = result.save(tmp_path / "q.safetensors")

    skeleton = build(kind, seed=99)
    assert not torch.equal(_outputs(skeleton, x), _outputs(result.model, x))
    restored = load_quantized(path, skeleton)

    assert restored is skeleton
    assert not restored.training
    assert torch.equal(_outputs(restored, x), _outputs(result.model, x))
    restored_types = {name: type(m) for name, m in restored.named_modules()}
    assert restored_types == {name: type(m) for name, m in result.model.named_modules()}


@pytest.mark.parametrize(
    ("mode", "qdtype"),
    [("int8-dynamic", torch.int8), ("int4", torch.uint8)],
)
def test_files_hold_real_low_bit_tensors(tmp_path, mode, qdtype):
    result = _quantize("mlp", mode)
    state = load_model(result.save(tmp_path / "q.safetensors"))
    for layer in ("fc1", "fc2", "head"):
        assert state[f"{layer}.qweight"].dtype is qdtype
        assert state[f"{layer}.weight_scale"].dtype is torch.float32
        assert f"{layer}.weight" not in state
    assert state["fc1.bias"].dtype is torch.float32
    if mode == "int4":
        assert state["fc1.qweight"].shape == (128, 64)  # two values per byte
        assert state["fc1.weight_scale"].shape == (128, 128 // 32)  # one scale per group


def test_saved_files_are_smaller(tmp_path):
    float_path = tmp_path / "float.safetensors"
    safetensors.torch.save_file(build("mlp").state_dict(), float_path)
    float_size = float_path.stat().st_size
    sizes = {mode: _quantize("mlp", mode).save(tmp_path / f"{mode}.safetensors").stat().st_size for mode in MODES}
    assert sizes["fp16"] < 0.55 * float_size
    assert sizes["int8-dynamic"] < 0.3 * float_size
    assert sizes["int4"] < sizes["int8-dynamic"]


def test_pt_save_path(tmp_path, mlp_inputs):
    result = _quantize("mlp", "int8-dynamic")
    path = result.save(tmp_path / "q.pt")

    assert path == tmp_path / "q.pt"
    raw = torch.load(path, weights_only=True)  # plain data: loadable by the safe unpickler
    assert set(raw) == {"state_dict", "mono_quant_metadata"}
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_NAME
    assert set(meta["layers"]) == {"fc1", "fc2", "head"}
    assert load_model(path).keys() == result.model.state_dict().keys()
    restored = load_quantized(path, build("mlp", seed=7))
    with torch.inference_mode():
        assert torch.equal(restored(mlp_inputs), result.model(mlp_inputs))


@pytest.mark.parametrize(
    ("name", "saved_as"),
    [("model", "model.safetensors"), ("model.bin", "model.bin.safetensors"), ("model.pth", "model.pth")],
)
def test_save_suffixes(tmp_path, name, saved_as):
    path = save_model(build("mlp"), tmp_path / name)
    assert path == tmp_path / saved_as
    assert path.is_file()


def test_save_creates_parent_folders(tmp_path):
    path = save_model(build("mlp"), tmp_path / "a" / "b" / "m.safetensors")
    assert path.is_file()


def test_save_model_rejects_other_objects(tmp_path):
    with pytest.raises(InputError, match="save_model needs an nn.Module or a state_dict, got list"):
        save_model([1, 2], tmp_path / "x.safetensors")


# -- metadata ------------------------------------------------------------------------------------
def test_metadata(tmp_path):
    result = _quantize("mlp", "int4")
    path = result.save(tmp_path / "q.safetensors")

    with safetensors.safe_open(str(path), "pt") as handle:
        raw = handle.metadata()
    assert all(isinstance(v, str) for v in raw.values())  # safetensors metadata is Dict[str, str]
    assert json.loads(raw["layers"])

    meta = read_metadata(path)
    assert meta["format"] == "mono_quant"
    assert meta["format_version"] == FORMAT_VERSION == "2"
    assert meta["mono_quant_version"] == mono_quant.__version__
    assert set(meta["layers"]) == {"fc1", "fc2", "head"}
    fc1 = meta["layers"]["fc1"]
    assert fc1["kind"] == "QuantizedLinear"
    assert (fc1["bits"], fc1["symmetric"], fc1["group_size"], fc1["activation"]) == (4, False, 32, "none")
    info = meta["quantization_info"]
    assert info["selected_layers"] == ["fc1", "fc2", "head"]
    assert info["bits"] == 4
    assert info["dtype"] == "quint4x2"


def test_metadata_of_cast_layers(tmp_path):
    meta = read_metadata(_quantize("lstm", "bf16").save(tmp_path / "q.safetensors"))
    assert meta["layers"] == {
        "embedding": {"kind": "cast", "dtype": "bfloat16"},
        "lstm": {"kind": "cast", "dtype": "bfloat16"},
        "head": {"kind": "cast", "dtype": "bfloat16"},
    }


def test_metadata_of_a_plain_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    assert read_metadata(path) == {"layers": {}}


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_metadata_of_a_plain_torch_file(tmp_path, suffix):
    path = tmp_path / f"plain{suffix}"
    torch.save(build("mlp").state_dict(), path)
    assert read_metadata(path) == {"layers": {}}


def test_metadata_of_a_missing_file(tmp_path):
    for name in ("missing.safetensors", "missing.pt"):
        with pytest.raises(InputError, match="cannot read"):
            read_metadata(tmp_path / name)


def test_metadata_that_is_not_json_is_an_input_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata={"format": "mono_quant", "layers": "{oops"})
    with pytest.raises(InputError, match="metadata field 'layers' is not valid JSON"):
        read_metadata(path)


# -- atomic writes -------------------------------------------------------------------------------
def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_leaves_no_temporary_files(tmp_path):
    result = _quantize("mlp", "int8-dynamic")
    result.save(tmp_path / "q.safetensors")
    result.save(tmp_path / "q.safetensors")  # overwrite
    result.save(tmp_path / "q.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt", "q.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_failed_save_keeps_the_existing_file(tmp_path, monkeypatch, suffix):
    path = save_model(build("mlp"), tmp_path / f"model{suffix}")
    before = path.read_bytes()

    def failing_writer(obj, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    monkeypatch.setattr(torch, "save", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        _quantize("mlp", "int8-dynamic").save(path)

    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == [path.name]


# -- state_dict results --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight-only", "int4", "fp16"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_state_dict_results_load_into_a_skeleton(tmp_path, kind, mode):
    kwargs = MODES[mode]
    from_state = quantize(build(kind).state_dict(), **kwargs)
    from_module = quantize(build(kind), **kwargs)
    path = from_state.save(tmp_path / "q.safetensors")

    meta = read_metadata(path)
    assert meta["layers"] == from_state.layers
    expected_kind = "cast" if mode == "fp16" else "auto"
    assert {cfg["kind"] for cfg in meta["layers"].values()} == {expected_kind}

    restored = load_quantized(path, build(kind, seed=42))
    x = inputs(kind)
    with torch.inference_mode():
        assert torch.equal(restored(x), from_module.model(x))
    if mode != "fp16":
        assert sum(isinstance(m, QuantizedModule) for m in restored.modules()) == len(meta["layers"])


# -- load_quantized errors -----------------------------------------------------------------------
def test_load_quantized_needs_a_module(tmp_path):
    path = _quantize("mlp", "int8-dynamic").save(tmp_path / "q.safetensors")
    with pytest.raises(InputError) as excinfo:
        load_quantized(path, build("mlp").state_dict())
    assert excinfo.value.message == "load_quantized needs the float model to load into, got OrderedDict"
    assert "architecture" in excinfo.value.suggestion


def test_load_quantized_into_another_architecture(tmp_path):
    path = _quantize("mlp", "int8-dynamic").save(tmp_path / "q.safetensors")
    with pytest.raises(InputError, match="the file has a quantized layer 'fc1' that the model does not have"):
        load_quantized(path, build("cnn"))


def test_load_quantized_with_mismatched_tensors(tmp_path):
    path = _quantize("mlp", "int8-dynamic").save(tmp_path / "q.safetensors")
    skeleton = build("mlp")
    skeleton.extra = nn.Linear(2, 2)
    with pytest.raises(InputError, match="the file does not match the model: missing"):
        load_quantized(path, skeleton)


def test_load_quantized_refuses_foreign_formats(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(build("mlp").state_dict(), path, metadata={"format": "pt"})
    with pytest.raises(InputError, match="has format 'pt', not 'mono_quant'"):
        load_quantized(path, build("mlp"))


def test_tied_weights_can_be_saved(tmp_path):
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    model[1].weight = model[0].weight  # tied, as in language models
    path = save_model(model, tmp_path / "tied.safetensors")
    state = load_model(path)
    assert torch.equal(state["0.weight"], state["1.weight"])


def test_version_1_files_load_their_dynamic_layers_as_symmetric_per_token(tmp_path):
    """Format version 1 wrote ``activation_symmetric: false`` for dynamic layers, which always ran
    symmetric per token: read that way, a version-1 file computes what it computed when saved."""
    result = quantize(build("mlp"), bits=8, dynamic=True, activation_scheme="symmetric")
    path = result.save(tmp_path / "v2.safetensors")
    with safetensors.safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - a handle, not a dict
    layers = json.loads(meta["layers"])
    assert {layer["activation_symmetric"] for layer in layers.values()} == {True}
    for layer in layers.values():
        layer["activation_symmetric"] = False  # what version 1 wrote
    old = tmp_path / "v1.safetensors"
    version_1 = {**meta, "format_version": "1", "layers": json.dumps(layers)}
    safetensors.torch.save_file(tensors, str(old), metadata=version_1)
    assert {c["activation_symmetric"] for c in read_metadata(old)["layers"].values()} == {True}
    x = inputs("mlp", n=8, seed=3)
    loaded = load_quantized(old, build("mlp"))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(result.model, x), rtol=0, atol=0)
