"""Safe loading: refused formats, corrupt files and hostile safetensors headers.

Every bad file must end in an InputError (or its UnsupportedFormatError child) naming the
problem: never a crash, a hang or an unbounded allocation.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

from mono_quant import InputError, UnsupportedFormatError, load_model
from mono_quant.io.handlers import (
    inspect_model_file,
    load_state_dict_file,
    prepare_model,
    read_safetensors_header,
    sniff_format,
)

from .conftest import build, inputs

pytestmark = pytest.mark.timeout(60)


def _write_safetensors(path, header: dict, data: bytes = b"\0" * 64, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)


# -- refused formats -----------------------------------------------------------------------------
def test_pickled_whole_module_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build("mlp"), path)
    with pytest.raises(UnsupportedFormatError) as excinfo:
        load_model(path)
    message = excinfo.value.message
    assert message.startswith("model.pt contains pickled Python objects")
    assert "which can run code when loaded; refused" in message
    assert "MLP" in message  # names what it found
    assert "\x1b" not in str(excinfo.value)  # no terminal escape codes in messages
    assert "weights_only=False" not in str(excinfo.value)  # never advises the unsafe load
    assert "safetensors" in excinfo.value.suggestion and "state_dict" in excinfo.value.suggestion


def test_torchscript_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(build("mlp")), str(path))
    assert sniff_format(path) == "torchscript"
    with pytest.raises(UnsupportedFormatError) as excinfo:
        load_model(path)
    assert excinfo.value.message == "scripted.pt is a TorchScript archive, which can run code when loaded; refused"
    assert "safetensors" in excinfo.value.suggestion


def test_torch_export_archive_is_refused(tmp_path):
    path = tmp_path / "exported.pt2"
    model = nn.Sequential(nn.Linear(8, 8))
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), str(path))
    assert sniff_format(path) == "pt2"
    with pytest.raises(UnsupportedFormatError, match=r"torch.export \(.pt2\) archive"):
        load_model(path)


def test_trusted_loads_a_pickled_module(tmp_path):
    model = build("mlp")
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = load_state_dict_file(path, trusted=True)
    assert isinstance(loaded, nn.Module)
    x = inputs("mlp")
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_trusted_loads_torchscript(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(build("mlp")), str(path))
    assert isinstance(load_state_dict_file(path, trusted=True), torch.jit.ScriptModule)


# -- accepted formats ----------------------------------------------------------------------------
def test_safetensors_state_dict(tmp_path):
    state = build("mlp").state_dict()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path)
    loaded = load_model(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "checkpoint-dict"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_weights_only_torch_state_dict(tmp_path, suffix, wrap):
    state = build("mlp").state_dict()
    path = tmp_path / f"m{suffix}"
    torch.save({"state_dict": state} if wrap else state, path)
    loaded = load_model(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_checkpoint_with_extras_is_an_input_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"fc.weight": torch.ones(2, 2), "epoch": 3}, path)
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    assert excinfo.value.message == "ckpt.pt: entries ['epoch'] are not name -> tensor pairs"
    assert "state_dict" in excinfo.value.suggestion


def test_a_file_without_a_state_dict_is_an_input_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(InputError, match=r"list.pt does not hold a state_dict \(found list\)"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.safetensors")


# -- corrupt and hostile files -------------------------------------------------------------------
def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(build("mlp").state_dict(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    assert type(excinfo.value) is InputError
    assert excinfo.value.message.startswith("m.safetensors is not a valid safetensors file: tensor")
    assert "past the data" in excinfo.value.message
    assert "truncated" in excinfo.value.suggestion


def test_truncated_inside_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(build("mlp").state_dict(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="exceeds the file"):
        load_model(path)


def _f32(begin: int, end: int, shape=(4,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


HOSTILE_HEADERS = {
    "offsets-past-the-end": (
        {"a": _f32(48, 64), "b": _f32(64, 80)},
        "tensor 'b' ends at byte 80, past the data (64 bytes)",
    ),
    "size-not-matching-shape": ({"a": _f32(0, 1000)}, "tensor 'a': 1000 bytes for shape [4] of F32"),
    "reversed-offsets": ({"a": _f32(16, 0)}, "tensor 'a' has invalid data_offsets [16, 0]"),
    "negative-offset": ({"a": _f32(-16, 0)}, "tensor 'a' has invalid data_offsets [-16, 0]"),
    "three-offsets": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}},
        "tensor 'a' has invalid data_offsets [0, 8, 16]",
    ),
    "overlap": ({"a": _f32(0, 16), "b": _f32(8, 24)}, "tensors 'a' and 'b' overlap"),
    "unknown-dtype": (
        {"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}},
        "tensor 'a' has unknown dtype 'Q7'",
    ),
    "negative-shape": ({"a": _f32(0, 16, shape=(-4,))}, "tensor 'a' has an invalid shape [-4]"),
    "huge-shape": ({"a": _f32(0, 16, shape=(2**40, 2**40))}, "tensor 'a': 16 bytes for shape"),
    "entry-not-an-object": ({"a": [1, 2, 3]}, "entry 'a' is not an object"),
    "metadata-not-strings": ({"__metadata__": {"layers": {"x": 1}}}, "__metadata__ must map strings to strings"),
    "bool-in-shape": ({"a": _f32(0, 16, shape=(True, 4))}, "tensor 'a' has an invalid shape [True, 4]"),
    "bool-offset": (
        {"a": {"dtype": "F32", "shape": [0], "data_offsets": [False, False]}},
        "tensor 'a' has invalid data_offsets [False, False]",
    ),
    "65-dimensions": ({"a": _f32(0, 0, shape=(0,) * 65)}, "tensor 'a' has 65 dimensions (at most 64)"),
    "hole-at-the-start": ({"a": _f32(16, 32)}, "16 bytes at the start of the data belong to no tensor"),
    "hole-between": (
        {"a": _f32(0, 16), "b": _f32(32, 48)},
        "16 bytes after tensor 'a' belong to no tensor (a hole in data_offsets)",
    ),
    "bytes-past-the-last-tensor": (
        {"a": _f32(0, 16)},
        "the tensors cover 16 bytes but the data holds 64 (bytes no tensor describes)",
    ),
}


@pytest.mark.parametrize(("header", "problem"), list(HOSTILE_HEADERS.values()), ids=list(HOSTILE_HEADERS))
def test_hostile_safetensors_headers(tmp_path, header, problem):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, header)
    for load in (load_model, read_safetensors_header, inspect_model_file):
        with pytest.raises(InputError) as excinfo:
            load(path)
        assert type(excinfo.value) is InputError
        assert excinfo.value.message.startswith(f"bad.safetensors is not a valid safetensors file: {problem}")
        assert "re-export" in excinfo.value.suggestion.lower()


def _write_raw_header(path, raw: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            "the key 'a' appears twice in the header",
        ),
        (
            b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "the header nests JSON deeper than a safetensors header can",
        ),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "the header nests JSON deeper than a safetensors header can"),
    ],
    ids=["duplicate-tensor-name", "deep-arrays", "deep-objects"],
)
def test_headers_json_loads_would_accept_or_crash_on(tmp_path, raw, problem):
    path = tmp_path / "bad.safetensors"
    _write_raw_header(path, raw, b"\0" * 8)
    for load in (load_model, read_safetensors_header, inspect_model_file):
        with pytest.raises(InputError) as excinfo:
            load(path)
        assert excinfo.value.message == f"bad.safetensors is not a valid safetensors file: {problem}"


def test_header_limits_bound_size_and_tensor_count(tmp_path):
    path = tmp_path / "many.safetensors"
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(1000)}
    _write_safetensors(path, header, data=b"")
    assert len(read_safetensors_header(path)[0]) == 1000
    with pytest.raises(InputError, match="the header declares more than 999 tensors \\(the limit\\)"):
        read_safetensors_header(path, max_tensors=999)
    size = len(json.dumps(header))
    with pytest.raises(InputError, match=f"header length {size} is over the limit of 1000 bytes"):
        read_safetensors_header(path, max_header_bytes=1000)


def test_a_zip_of_100001_entries_is_counted_not_opened(tmp_path, monkeypatch):
    """zipfile builds an object per entry when it opens an archive: sniffing must not."""
    import zipfile

    from mono_quant.io.handlers import zip_member_count

    path = tmp_path / "crowded.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(100_001):
            archive.writestr(f"{index}", b"")
    assert zip_member_count(path) == 100_001  # past 65535: read from the zip64 record

    def refuse(*args, **kwargs):
        raise AssertionError("ZipFile opened a 100001-entry archive")

    monkeypatch.setattr(zipfile, "ZipFile", refuse)
    assert sniff_format(path) == "zip"
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert zip_member_count(truncated) is None
    assert sniff_format(truncated) == "unknown"


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, {}, header_len=2**63)
    with pytest.raises(InputError, match=r"header length 9223372036854775808 exceeds the file"):
        load_model(path)


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, [1, 2])
    with pytest.raises(InputError, match="header is not a JSON object"):
        read_safetensors_header(path)
    with pytest.raises(UnsupportedFormatError, match="unrecognised model file format"):
        load_model(path)  # not even sniffed as safetensors


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 8)
    with pytest.raises(InputError, match="header is not JSON"):
        load_model(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
@pytest.mark.parametrize("size", [0, 3, 4096])
def test_random_bytes(tmp_path, suffix, size):
    path = tmp_path / f"random{suffix}"
    # Seeded, and without the bytes the sniffer keys on (a pickle's \x80, a zip's PK, a
    # safetensors header's "{" at offset 8): os.urandom put "{" there once in 256 runs.
    data = random.Random(size).randbytes(size).replace(b"\x80", b"\x00").replace(b"PK", b"pk")
    path.write_bytes(data.replace(b"{", b"["))
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    assert excinfo.value.message == f"random{suffix}: unrecognised model file format"
    assert ".safetensors" in excinfo.value.suggestion


def test_corrupt_torch_archive_is_an_input_error(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(build("mlp").state_dict(), path)
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[: len(raw) - 200]))  # the zip directory at the end is lost
    with pytest.raises(InputError):
        load_model(path)


@pytest.mark.parametrize("data", [b"\x80\x04junk", b"\x80\x02}q\x00(X"], ids=["junk", "cut-off"])
def test_damaged_legacy_pickle_is_an_input_error(tmp_path, data):
    path = tmp_path / "m.pt"
    path.write_bytes(data)
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    assert excinfo.value.message.startswith("m.pt could not be read as a PyTorch checkpoint")
    assert "truncated or corrupt" in excinfo.value.suggestion


def test_metadata_of_refused_or_corrupt_pt_files(tmp_path):
    from mono_quant import load_quantized, read_metadata

    whole = tmp_path / "whole.pt"
    torch.save(build("mlp"), whole)
    with pytest.raises(UnsupportedFormatError, match="contains pickled Python objects"):
        read_metadata(whole)
    with pytest.raises(UnsupportedFormatError, match="contains pickled Python objects"):
        load_quantized(whole, build("mlp"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04junk")
    with pytest.raises(InputError, match="could not be read as a PyTorch checkpoint"):
        read_metadata(junk)


def test_a_pickle_stream_with_code_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    import pickle

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    with pytest.raises(InputError):
        load_model(path)


# -- prepare_model -------------------------------------------------------------------------------
def test_prepare_model_passes_modules_through_and_copies_state_dicts(tmp_path):
    model = build("mlp")
    assert prepare_model(model) is model
    state = model.state_dict()
    copy = prepare_model(state)
    assert copy == state and copy is not state
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path)
    assert prepare_model(str(path)).keys() == state.keys()


def test_inspect_model_file(tmp_path):
    state = build("mlp").state_dict()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path, metadata={"note": "x"})
    summary = inspect_model_file(path)
    assert summary["format"] == "safetensors"
    assert summary["tensors"] == len(state)
    assert summary["parameters"] == sum(t.numel() for t in state.values())
    assert summary["dtypes"] == ["F32"]
    assert summary["metadata"] == {"note": "x"}
    assert summary["size_bytes"] == path.stat().st_size
