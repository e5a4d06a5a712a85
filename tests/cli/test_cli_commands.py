"""The monoquant / mq command line, through click's runner on real files."""

from __future__ import annotations

import json

import pytest
import torch

from mono_quant import load_model, load_quantized, read_metadata
from mono_quant.cli.main import cli

from .conftest import make_mlp


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# -- quantize ------------------------------------------------------------------------------------
def test_quantize_int8_default_is_dynamic(runner, model_file, tmp_path):
    out = tmp_path / "q8.safetensors"
    result = _ok(runner.invoke(cli, ["quantize", str(model_file), "-o", str(out), "--no-progress"]))
    assert f"wrote {out}" in result.stdout
    layers = read_metadata(out)["layers"]
    assert set(layers) == {"0", "2", "4"}
    assert {(c["bits"], c["activation"], c["symmetric"]) for c in layers.values()} == {(8, "dynamic", True)}
    x = torch.randn(4, 128)
    restored = load_quantized(out, make_mlp(seed=5))
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(restored(x), make_mlp()(x), dim=-1)
    assert float(cos.min()) > 0.999


def test_quantize_int4(runner, model_file, tmp_path):
    out = tmp_path / "q4.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(model_file), "--bits", "4", "--group-size", "32", "-o", str(out)]))
    layers = read_metadata(out)["layers"]
    assert {(c["bits"], c["group_size"], c["symmetric"]) for c in layers.values()} == {(4, 32, False)}
    assert load_model(out)["0.qweight"].dtype is torch.uint8
    assert out.stat().st_size < 0.25 * model_file.stat().st_size


def test_quantize_int4_symmetric(runner, model_file, tmp_path):
    out = tmp_path / "q4s.safetensors"
    args = ["quantize", str(model_file), "--bits", "4", "--group-size", "64", "--scheme", "symmetric", "-o", str(out)]
    _ok(runner.invoke(cli, args))
    assert {c["symmetric"] for c in read_metadata(out)["layers"].values()} == {True}


@pytest.mark.parametrize(("flags", "dtype"), [([], "float16"), (["--bf16"], "bfloat16")], ids=["fp16", "bf16"])
def test_quantize_16_bits(runner, model_file, tmp_path, flags, dtype):
    out = tmp_path / "q16.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(model_file), "--bits", "16", *flags, "-o", str(out)]))
    assert read_metadata(out)["layers"]["0"] == {"kind": "cast", "dtype": dtype}
    assert load_model(out)["0.weight"].dtype is getattr(torch, dtype)


def test_quantize_weight_only(runner, model_file, tmp_path):
    out = tmp_path / "wo.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(model_file), "--weight-only", "-o", str(out)]))
    assert {c["activation"] for c in read_metadata(out)["layers"].values()} == {"none"}


@pytest.mark.parametrize(
    ("flags", "layers"),
    [
        (["--include", "0,2"], {"0", "2"}),
        (["--include", "0", "--include", "4"], {"0", "4"}),
        (["--exclude", "4"], {"0", "2"}),
        (["--exclude", "re:[02]"], {"4"}),
    ],
    ids=["include-comma", "include-repeated", "exclude", "exclude-regex"],
)
def test_quantize_include_exclude(runner, model_file, tmp_path, flags, layers):
    out = tmp_path / "sel.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(model_file), *flags, "-o", str(out)]))
    assert set(read_metadata(out)["layers"]) == layers


def test_a_streamed_output_named_pt_is_still_readable(runner, model_file, tmp_path):
    out = tmp_path / "q.pt"  # the streaming path writes safetensors whatever the name
    _ok(runner.invoke(cli, ["quantize", str(model_file), "--no-progress", "-o", str(out)]))
    assert "format: mono_quant v2" in _ok(runner.invoke(cli, ["info", str(out)])).stdout
    assert set(read_metadata(out)["layers"]) == {"0", "2", "4"}
    restored = load_quantized(out, make_mlp(seed=2))
    with torch.inference_mode():
        assert restored(torch.randn(2, 128)).shape == (2, 10)


def test_quantize_a_pt_state_dict(runner, model_pt, tmp_path):
    out = tmp_path / "from-pt.safetensors"
    result = _ok(runner.invoke(cli, ["quantize", str(model_pt), "--no-progress", "-o", str(out)]))
    assert "quantized 3 layers, skipped 0" in result.stdout
    assert set(read_metadata(out)["layers"]) == {"0", "2", "4"}


def test_quantize_shows_progress(runner, model_pt, tmp_path):
    result = _ok(runner.invoke(cli, ["quantize", str(model_pt), "-o", str(tmp_path / "q.safetensors")]))
    assert "quantize" in result.stderr


def test_static_on_a_weights_file_is_an_input_error(runner, model_file, calibration_file, tmp_path):
    out = tmp_path / "static.safetensors"
    args = ["quantize", str(model_file), "--static", "--calibration", str(calibration_file), "-o", str(out)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    assert "Error (InputError): static quantization needs a model it can run" in result.stderr
    assert "Suggestion: Pass the nn.Module itself" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_static_without_calibration(runner, model_file, tmp_path):
    result = runner.invoke(cli, ["quantize", str(model_file), "--static", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "Error (InputError): static int8 quantization (dynamic=False) needs calibration data",
        "Suggestion: Give calibration data (calibration_data= in Python, --calibration FILE in the CLI, a "
        "calibration file or dataset_id over HTTP), or use dynamic=True / weight_only=True, which need no data.",
    ]


def test_static_on_a_hugging_face_folder(runner, tiny_hf_folder, tmp_path):
    folder, calibration, model = tiny_hf_folder
    out = tmp_path / "bert-static.safetensors"
    args = ["quantize", str(folder), "--static", "--calibration", str(calibration), "--observer", "histogram"]
    result = _ok(runner.invoke(cli, [*args, "--no-progress", "-o", str(out)]))
    assert "skipped 0" in result.stdout

    meta = read_metadata(out)
    linears = {n: c for n, c in meta["layers"].items() if c["kind"] == "QuantizedLinear"}
    assert len(linears) == 2 * 6 + 1  # 6 Linear per encoder layer, and the pooler
    assert {c["activation"] for c in linears.values()} == {"static"}
    assert meta["quantization_info"]["observer_type"] == "histogram"
    assert meta["quantization_info"]["calibration_samples_used"] == 16

    import transformers

    restored = load_quantized(out, transformers.BertModel(model.config).eval())
    ids = torch.randint(1, 100, (4, 10))
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(
            restored(input_ids=ids).last_hidden_state.flatten(1), model(input_ids=ids).last_hidden_state.flatten(1)
        )
    assert float(cos.min()) > 0.98


# -- info ----------------------------------------------------------------------------------------
@pytest.fixture
def int4_file(runner, model_file, tmp_path):
    out = tmp_path / "q4.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(model_file), "--bits", "4", "--group-size", "32", "-o", str(out)]))
    return out


def test_info_text(runner, int4_file):
    result = _ok(runner.invoke(cli, ["info", str(int4_file)]))
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{int4_file}: safetensors, 12 tensors, ")
    assert lines[1] == "dtypes: F32, U8"
    assert lines[2].startswith("format: mono_quant v2 (mono_quant ")
    assert "  0: int4 asym g32, activation=none" in lines
    assert "  4: int4 asym g32, activation=none" in lines


def test_info_json(runner, int4_file):
    data = json.loads(_ok(runner.invoke(cli, ["info", "--json", str(int4_file)])).stdout)
    assert data["format"] == "safetensors"
    assert data["tensors"] == 12
    assert data["size_bytes"] == int4_file.stat().st_size
    assert data["metadata"]["format"] == "mono_quant"
    assert data["metadata"]["layers"]["2"]["bits"] == 4
    assert data["metadata"]["quantization_info"]["bits"] == 4


def test_info_on_a_pt_file_saved_by_mono_quant(runner, tmp_path):
    from mono_quant import quantize

    path = quantize(make_mlp(), bits=8, dynamic=True).save(tmp_path / "q.pt")
    result = _ok(runner.invoke(cli, ["info", str(path)]))
    assert result.stdout.splitlines()[0].startswith(f"{path}: pytorch, 9 tensors")
    assert "  2: int8 sym, activation=dynamic" in result.stdout
    data = json.loads(_ok(runner.invoke(cli, ["info", "--json", str(path)])).stdout)
    assert set(data["metadata"]["layers"]) == {"0", "2", "4"}


def test_info_on_a_plain_file(runner, model_file, model_pt):
    result = _ok(runner.invoke(cli, ["info", str(model_file)]))
    assert "6 tensors" in result.stdout and "dtypes: F32" in result.stdout
    data = json.loads(_ok(runner.invoke(cli, ["info", "--json", str(model_pt)])).stdout)
    assert data["format"] == "pytorch" and data["tensors"] == 6


# -- validate and compare ------------------------------------------------------------------------
def test_validate(runner, model_file, int4_file):
    result = _ok(runner.invoke(cli, ["validate", str(model_file), str(int4_file)]))
    assert result.stdout.startswith("PASSED: 3 layers, mean weight SQNR ")
    assert "reload ok" in result.stdout


def test_validate_json(runner, model_file, int4_file):
    data = json.loads(_ok(runner.invoke(cli, ["validate", "--json", str(model_file), str(int4_file)])).stdout)
    assert data["passed"] is True
    assert set(data["layer_sqnr_db"]) == {"0", "2", "4"}
    assert all(10 < v < 40 for v in data["layer_sqnr_db"].values())
    assert data["original_size_bytes"] == model_file.stat().st_size
    assert data["quantized_size_bytes"] == int4_file.stat().st_size
    assert data["compression_ratio"] > 4
    assert data["reload_ok"] is True


def test_validate_failure_exits_1(runner, model_file, int4_file):
    result = runner.invoke(cli, ["validate", "--threshold", "200", str(model_file), str(int4_file)])
    assert result.exit_code == 1
    assert result.stdout.startswith("FAILED: 3 layers")
    assert "below the weight SQNR threshold of 200.0 dB" in result.stdout


def test_compare(runner, model_file, int4_file):
    result = _ok(runner.invoke(cli, ["compare", str(model_file), str(int4_file)]))
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0.weight", "2.weight", "4.weight", "mean"]
    assert all(r[2] == "dB" and 10 < float(r[1]) < 40 for r in rows)


def test_compare_json_and_identical_files(runner, model_file, model_pt, int4_file):
    data = json.loads(_ok(runner.invoke(cli, ["compare", "--json", str(model_file), str(int4_file)])).stdout)
    assert set(data) == {"0.weight", "2.weight", "4.weight"}
    same = json.loads(_ok(runner.invoke(cli, ["compare", "--json", str(model_file), str(model_pt)])).stdout)
    assert set(same.values()) == {None}  # identical tensors: infinite SQNR


def test_compare_unrelated_files(runner, model_file, tmp_path):
    import safetensors.torch

    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w.weight": torch.randn(3, 3)}, other)
    result = runner.invoke(cli, ["compare", str(model_file), str(other)])
    assert result.exit_code == 2
    assert "Error (InputError): model.safetensors and other.safetensors share no weight tensors" in result.stderr
    assert "Suggestion: Compare a model with its own quantized version." in result.stderr


# -- errors --------------------------------------------------------------------------------------
@pytest.fixture
def pickled_module(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(make_mlp(), path)
    return path


@pytest.mark.parametrize("command", ["quantize", "info"])
def test_errors_print_message_and_suggestion_without_traceback(runner, pickled_module, tmp_path, command):
    args = [command, str(pickled_module)] + (["-o", str(tmp_path / "x.safetensors")] if command == "quantize" else [])
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    first, second = result.stderr.splitlines()
    assert first.startswith("Error (UnsupportedFormatError): whole.pt contains pickled Python objects")
    assert second.startswith("Suggestion: Save a state_dict to safetensors instead")
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_verbose_adds_the_traceback(runner, pickled_module):
    result = runner.invoke(cli, ["-v", "info", str(pickled_module)])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "Error (UnsupportedFormatError)" in result.stderr


def test_corrupt_file(runner, model_file):
    model_file.write_bytes(model_file.read_bytes()[:-500])
    result = runner.invoke(cli, ["info", str(model_file)])
    assert result.exit_code == 2
    assert "Error (InputError): model.safetensors is not a valid safetensors file" in result.stderr
    assert "Suggestion: Re-export the file" in result.stderr


def test_validating_against_the_wrong_original_fails(runner, model_file, tmp_path):
    import safetensors.torch

    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(make_mlp(seed=1).state_dict(), other)
    quantized = tmp_path / "other-int8.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(other), "-o", str(quantized)]))
    result = runner.invoke(cli, ["validate", str(model_file), str(quantized)])
    assert result.exit_code == 1
    assert result.stdout.startswith("FAILED: 3 layers")
    assert "3 layer(s) below the weight SQNR threshold of 25.0 dB" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "missing.safetensors", "-o", "x.safetensors"], "does not exist"),
        (["quantize", "{model}", "--bits", "5", "-o", "x.safetensors"], "'5' is not one of '4', '8', '16'"),
        (["quantize", "{model}"], "Missing option '-o' / '--output'"),
        (["quantize", "{model}", "--observer", "median", "-o", "x.safetensors"], "'median' is not one of"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
    ids=["missing-file", "bits", "no-output", "observer", "command"],
)
def test_usage_errors(runner, model_file, args, message):
    result = runner.invoke(cli, [a.format(model=model_file) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_help_lists_the_commands(runner):
    result = _ok(runner.invoke(cli, ["--help"]))
    for command in ("quantize", "info", "validate", "compare"):
        assert command in result.stdout


def test_format_picks_the_defaults_it_can_store(runner, tiny_hf_folder, tmp_path):
    """A BERT folder gets the data-free defaults (HQQ for int4, SmoothQuant for int8 dynamic,
    both from random tokens); compressed-tensors stores neither HQQ's float zero points nor an
    input scale, so --format compressed-tensors quantizes with what it can store instead."""
    pytest.importorskip("compressed_tensors")
    folder, _, _ = tiny_hf_folder
    plain = tmp_path / "int4.safetensors"
    _ok(runner.invoke(cli, ["quantize", str(folder), "--bits", "4", "--no-progress", "-o", str(plain)]))
    assert {c["method"] for c in read_metadata(plain)["layers"].values() if c["kind"] == "QuantizedLinear"} == {"hqq"}
    for bits in (["--bits", "4"], ["--bits", "8", "--dynamic"]):
        out = tmp_path / f"ct{bits[1]}"
        args = ["quantize", str(folder), *bits, "--format", "compressed-tensors", "--no-progress", "-o", str(out)]
        _ok(runner.invoke(cli, args))
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        assert groups and all(g["weights"]["num_bits"] == int(bits[1]) for g in groups.values())
