"""Text calibration and eval, accuracy in the report, and exports, over HTTP.

The fast tests use a tiny random Llama (2 layers, tied embeddings, sharded safetensors) with
MiniLM's tokenizer files; the real models are in test_service_llm.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.app.conftest import assert_problem, run_to_report, upload, wait_for

pytestmark = pytest.mark.minilm  # the tokenizer files come from the packaged MiniLM

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _zip(folder: Path, archive: Path, names=None) -> Path:
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            if path.is_file() and (names is None or path.name in names):
                zipped.write(path, f"model/{path.name}")
    return archive


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A zipped 2-layer Llama folder: sharded safetensors (index + 2+ shards), tied embeddings,
    MiniLM's tokenizer files."""
    from mono_quant.testing import minilm_dir, tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=30522, max_position_embeddings=256).save_pretrained(folder, max_shard_size="3MB")
    for name in _TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    return _zip(folder, folder.parent / "tiny-llama.zip")


@pytest.fixture(scope="module")
def tiny_llama_without_tokenizer(tiny_llama, tmp_path_factory) -> Path:
    archive = tmp_path_factory.mktemp("no-tokenizer") / "tiny-llama-no-tokenizer.zip"
    with zipfile.ZipFile(tiny_llama) as source, zipfile.ZipFile(archive, "w") as target:
        for info in source.infolist():
            if Path(info.filename).name not in _TOKENIZER_FILES:
                target.writestr(info, source.read(info))
    return archive


def _text(name: str, content: str | bytes, field: str = "calibration") -> dict:
    data = content.encode() if isinstance(content, str) else content
    return {field: (name, data, "text/plain")}


def _paragraphs(count: int, start: int = 0) -> str:
    from mono_quant.testing import SENTENCES

    return "\n\n".join(
        " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(6)) for i in range(start, start + count)
    )


def _no_jobs(http) -> None:
    assert http.get("/v1/jobs").json()["items"] == []


# -- submission checks (no worker runs) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("bad.txt", b"caf\xe9 au lait\n", "line 1 is not valid UTF-8"),
        ("empty.txt", "\n \n\n", "holds no text"),
        ("bad.jsonl", '{"text": "fine"}\n{"txt": "typo"}\n', 'line 2 is not an object with a string "text"'),
        ("bad.jsonl", '{"text": "fine"}\n[1, 2]\n', "line 2 is not an object"),
        ("broken.jsonl", '{"text": "unterminated\n', "line 1 is not valid JSON"),
        ("cut.txt", "ok \xe9".encode()[:-1], "ends inside a UTF-8 character"),
    ],
    ids=["latin1", "blank-only", "jsonl-no-text-key", "jsonl-array", "jsonl-invalid", "truncated-utf8"],
)
def test_invalid_text_calibration_is_400(paused_service, tiny_llama, name, content, fragment):
    response = paused_service.post(
        "/v1/quantize", files={**upload(tiny_llama), **_text(name, content)}, data={"bits": "8", "dynamic": "true"}
    )
    body = assert_problem(response, 400, "input-error")
    assert fragment in body["detail"] and name in body["detail"]
    assert body["suggestion"]
    _no_jobs(paused_service)


def test_text_over_the_limit_is_413(make_paused_service, tiny_llama):
    with make_paused_service(max_text_bytes=64) as http:
        response = http.post(
            "/v1/quantize", files={**upload(tiny_llama), **_text("big.txt", "x" * 65)}, data={"bits": "8"}
        )
        body = assert_problem(response, 413, "input-too-large-error")
        assert "MONOQUANT_MAX_TEXT_BYTES" in body["suggestion"]


@pytest.mark.parametrize("field", ["calibration", "eval"])
def test_text_needs_a_tokenizer(paused_service, tiny_llama_without_tokenizer, tiny_model_file, field):
    data = {"bits": "8", "dynamic": "true"}
    for model in (upload(tiny_llama_without_tokenizer), upload(tiny_model_file)):
        response = paused_service.post("/v1/quantize", files={**model, **_text("t.txt", "Hello.", field)}, data=data)
        if field == "calibration" and "tiny.safetensors" in model["model"][0]:
            body = assert_problem(response, 400, "input-error")  # a weights file cannot run calibration
            assert "has no forward" in body["detail"]
            continue
        body = assert_problem(response, 400, "input-error")
        assert f"{field} text needs the model's tokenizer" in body["detail"]
        assert "tokenizer.save_pretrained" in body["suggestion"]
    _no_jobs(paused_service)


def test_eval_must_be_text(paused_service, tiny_llama):
    response = paused_service.post(
        "/v1/quantize",
        files={**upload(tiny_llama), "eval": ("eval.safetensors", b"\x08\0\0\0\0\0\0\0{}      ", "x/y")},
        data={"bits": "4"},
    )
    assert response.status_code in (400, 415), response.text
    _no_jobs(paused_service)


def test_gptq_without_calibration_is_422(paused_service, tiny_llama):
    response = paused_service.post("/v1/quantize", files=upload(tiny_llama), data={"bits": "4", "method": "gptq"})
    body = assert_problem(response, 422, "configuration-error")
    assert "method='gptq' needs calibration data" in body["detail"]
    assert "method='rtn'" in body["suggestion"]
    _no_jobs(paused_service)


def test_calibration_the_mode_does_not_use_is_422(paused_service, tiny_llama):
    response = paused_service.post(
        "/v1/quantize",
        files={**upload(tiny_llama), **_text("c.txt", _paragraphs(3))},
        data={"bits": "4", "method": "rtn"},  # int4's default (HQQ) would weigh its rounding by the text
    )
    body = assert_problem(response, 422, "configuration-error")
    assert "int4 (weight-only) with method='rtn' does not use it" in body["detail"]
    assert "eval file" in body["suggestion"]
    _no_jobs(paused_service)


@pytest.mark.parametrize(
    ("data", "model", "fragment", "suggestion"),
    [
        ({"bits": "4", "export_formats": "gguf,tflite"}, "llama", "unknown export format 'tflite'", "onnx"),
        ({"bits": "16", "export_formats": "onnx"}, "llama", "ONNX export writes integer graphs", "torch.onnx.export"),
        ({"bits": "4", "group_size": "16", "export_formats": "gguf"}, "llama", "multiple of 32", "group_size=32"),
        ({"bits": "8", "dynamic": "true", "export_formats": "gguf"}, "weights", "model's architecture", "zip"),
    ],
    ids=["unknown-format", "onnx-cast", "gguf-group16", "weights-file"],
)
def test_export_formats_refused_at_submission(
    paused_service, tiny_llama, tiny_model_file, data, model, fragment, suggestion
):
    files = upload(tiny_llama if model == "llama" else tiny_model_file)
    body = assert_problem(paused_service.post("/v1/quantize", files=files, data=data), 422, "configuration-error")
    assert fragment in body["detail"]
    assert suggestion in body["suggestion"]
    _no_jobs(paused_service)


def test_gguf_refuses_an_architecture_it_cannot_write(paused_service, tmp_path):
    from mono_quant.testing import minilm_dir

    archive = tmp_path / "minilm.zip"
    _zip(minilm_dir(), archive, ("config.json", "model.safetensors", *_TOKENIZER_FILES))
    config = json.loads((minilm_dir() / "config.json").read_text())
    if config["model_type"] == "bert":  # GGUF writes bert: check a model type it does not
        with zipfile.ZipFile(archive) as source:
            members = {info.filename: source.read(info) for info in source.infolist()}
        members["model/config.json"] = json.dumps({**config, "model_type": "distilbert"}).encode()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as target:
            for name, content in members.items():
                target.writestr(name, content)
        archive.write_bytes(buffer.getvalue())
    response = paused_service.post(
        "/v1/quantize", files=upload(archive), data={"bits": "8", "dynamic": "true", "export_formats": "gguf"}
    )
    body = assert_problem(response, 422, "configuration-error")
    assert "architecture" in body["detail"]


def test_uploads_record_text_and_tokenizer(paused_service, tiny_llama, tiny_llama_without_tokenizer):
    model = paused_service.post("/v1/models", files={"file": ("llama.zip", tiny_llama.read_bytes())})
    assert model.status_code == 201, model.text
    assert model.json()["details"]["tokenizer"] is True and model.json()["details"]["weight_files"] >= 2
    bare = paused_service.post("/v1/models", files={"file": ("bare.zip", tiny_llama_without_tokenizer.read_bytes())})
    assert bare.json()["details"]["tokenizer"] is False
    lines = '{"text": "One."}\n\n{"text": "Two."}\n{"text": "   "}\n'
    dataset = paused_service.post("/v1/datasets", files={"file": ("d.jsonl", lines.encode())})
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["format"] == "jsonl" and dataset.json()["details"]["documents"] == 2
    text = paused_service.post("/v1/datasets", files={"file": ("d.txt", b"a\nb\n\n\nc\n")})
    assert text.json()["format"] == "text" and text.json()["details"]["documents"] == 2


def test_tokenizer_config_with_remote_code_is_415(paused_service, tiny_llama, tmp_path):
    archive = tmp_path / "remote.zip"
    with zipfile.ZipFile(tiny_llama) as source, zipfile.ZipFile(archive, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith("tokenizer_config.json"):
                content = json.dumps({**json.loads(content), "auto_map": {"AutoTokenizer": "x.Tok"}}).encode()
            target.writestr(info.filename, content)
    body = assert_problem(
        paused_service.post("/v1/models", files={"file": ("remote.zip", archive.read_bytes())}),
        415,
        "unsupported-format-error",
    )
    assert "auto_map" in body["detail"]


# -- jobs that run --------------------------------------------------------------------------------
def test_text_calibration_held_out_perplexity_and_export(service, tiny_llama):
    """int8 dynamic + text calibration (SmoothQuant) on a sharded, tied Llama: the last 10% of
    the packed sequences are held out and measured; compressed-tensors comes back zipped."""
    response = service.post(
        "/v1/quantize",
        files={**upload(tiny_llama), **_text("calibration.txt", _paragraphs(40))},
        data={"bits": "8", "dynamic": "true", "seq_len": "64", "seed": "3", "export_formats": "onnx"},
    )
    assert response.status_code == 202, response.text
    job = wait_for(service, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    calibration, accuracy = report["calibration"], report["accuracy"]
    assert calibration["seq_len"] == 64 and calibration["seed"] == 3 and calibration["documents"] == 40
    assert calibration["held_out_windows"] == accuracy["windows"] >= 1
    assert calibration["samples"] == calibration["windows"]  # fewer windows than the library's 128
    assert "held out" in accuracy["source"]
    assert accuracy["perplexity_before"] > 1 and accuracy["perplexity_after"] > 1
    # a random 2-layer model: int8 moves its perplexity by well under 5%
    assert abs(accuracy["perplexity_change_pct"]) < 5, accuracy
    assert job["metrics"]["perplexity_after"] == pytest.approx(accuracy["perplexity_after"])
    assert job["metrics"]["smoothing_alpha"] == report["library_metrics"]["smoothing"]["alpha"]
    assert report["validation"]["output_cosine"] > 0.5  # random weights: logits near zero, cosine is noisy
    listing = {a["name"]: a for a in service.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert set(listing) == {"model.safetensors", "report.json", "model.onnx"}
    (export,) = report["exports"]
    assert export["format"] == "onnx" and export["export_s"] >= 0
    onnx_bytes = service.get(listing["model.onnx"]["url"]).content
    assert hashlib.sha256(onnx_bytes).hexdigest() == listing["model.onnx"]["sha256"] == export["sha256"]
    assert onnx_bytes[:2] == b"\x08\x0a" or len(onnx_bytes) > 1000  # a protobuf ModelProto


def test_smoothquant_run_for_a_format_without_input_scales_smooths_where_it_folds(paused_service, tiny_llama):
    """compressed-tensors stores no input scale: the job smooths only where the scale folds into
    the layer before (the default export_formats picks); asked to smooth everywhere, it is a 422."""
    files = {**upload(tiny_llama), **_text("calibration.txt", _paragraphs(4))}
    data = {"bits": "8", "dynamic": "true", "export_formats": "compressed-tensors"}
    response = paused_service.post("/v1/quantize", files=files, data={**data, "smoothing_folded_only": "false"})
    body = assert_problem(response, 422, "configuration-error")
    assert "SmoothQuant" in body["detail"] and "smoothing_folded_only=True" in body["suggestion"]
    _no_jobs(paused_service)
    response = paused_service.post("/v1/quantize", files=files, data=data)
    assert response.status_code == 202, response.text
    assert len(paused_service.get("/v1/jobs").json()["items"]) == 1


def test_eval_upload_and_jsonl_calibration_by_id(service, tiny_llama):
    """An eval upload is measured whole (nothing held out of the calibration); datasets by id;
    GPTQ uses the text calibration; compressed-tensors comes back zipped with the tokenizer."""
    calibration = "\n".join(json.dumps({"text": paragraph}) for paragraph in _paragraphs(30).split("\n\n"))
    dataset = service.post("/v1/datasets", files={"file": ("calibration.jsonl", calibration.encode())})
    assert dataset.status_code == 201, dataset.text
    response = service.post(
        "/v1/quantize",
        files={
            **upload(tiny_llama),
            **_text("eval.txt", _paragraphs(12, start=30), "eval"),
            "dataset_id": (None, dataset.json()["id"]),
        },
        data={
            "bits": "4",
            "method": "gptq",
            "group_size": "32",
            "seq_len": "48",
            "export_formats": "compressed-tensors",
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["eval_id"] and response.json()["dataset_id"] == dataset.json()["id"]
    job = wait_for(service, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["calibration"]["held_out_windows"] == 0 and report["calibration"]["format"] == "jsonl"
    assert report["accuracy"]["source"] == "eval upload eval.txt"
    assert report["accuracy"]["seq_len"] == 48
    assert job["metrics"]["method"] == "gptq" and job["metrics"]["perplexity_before"] > 1
    listing = {a["name"]: a for a in service.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert set(listing) == {"model.safetensors", "report.json", "compressed-tensors.zip"}
    assert listing["compressed-tensors.zip"]["media_type"] == "application/zip"
    (export,) = report["exports"]
    zipped = service.get(listing["compressed-tensors.zip"]["url"]).content
    assert hashlib.sha256(zipped).hexdigest() == listing["compressed-tensors.zip"]["sha256"] == export["sha256"]
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        names = set(archive.namelist())
        config = json.loads(archive.read("config.json"))
    assert {"config.json", "tokenizer.json"} <= names
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_hf_upload_without_text_gets_output_metrics_from_dummy_inputs(service, tiny_llama_without_tokenizer):
    response = service.post("/v1/quantize", files=upload(tiny_llama_without_tokenizer), data={"bits": "4"})
    job = wait_for(service, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["output_cosine"] > 0.9 and job["metrics"]["output_sqnr_db"] is not None
    report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["accuracy"] is None and report["calibration"] is None


def test_a_broken_tokenizer_fails_only_jobs_that_read_text(service, tiny_llama, tmp_path):
    archive = tmp_path / "broken-tokenizer.zip"
    with zipfile.ZipFile(tiny_llama) as source, zipfile.ZipFile(archive, "w") as target:
        for info in source.infolist():
            broken = info.filename.endswith(("tokenizer.json", "vocab.txt"))
            target.writestr(info.filename, b"not a tokenizer" if broken else source.read(info))
    plain = service.post("/v1/quantize", files=upload(archive), data={"bits": "8", "dynamic": "true"})
    assert wait_for(service, plain.json()["id"], timeout=300)["status"] == "succeeded"
    with_text = service.post(
        "/v1/quantize",
        files={**upload(archive), **_text("eval.txt", _paragraphs(3), "eval")},
        data={"bits": "8", "dynamic": "true"},
    )
    job = wait_for(service, with_text.json()["id"], timeout=300)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "InputError" and "cannot load the tokenizer" in job["error"]["message"]
    assert "save_pretrained" in job["error"]["suggestion"]


def test_rotation_runs_on_a_llama_and_is_refused_where_it_cannot_apply(service, tiny_llama, tiny_model_file):
    """``rotation=true``: a form field like every quantize option; on a tied Llama the report
    records it and the warning that the head was untied, and the compressed-tensors export is
    written. Its option rule is a 422; a plain weights file, which has no structure to rotate, a
    400 at submission."""
    data = {"bits": "8", "dynamic": "true", "rotation": "true", "seq_len": "64"}
    _, report = run_to_report(
        service,
        {**upload(tiny_llama), **_text("calibration.txt", _paragraphs(20))},
        {**data, "export_formats": "compressed-tensors"},
    )
    (export,) = report["exports"]
    assert export["format"] == "compressed-tensors"
    assert report["library_metrics"]["rotation"]["untied_output_head"] > 0
    assert any("untied the output head" in w for w in report["warnings"])
    assert abs(report["accuracy"]["perplexity_change_pct"]) < 5, report["accuracy"]

    refused = service.post(
        "/v1/quantize", files=upload(tiny_llama), data={"bits": "8", "weight_only": "true", "rotation": "true"}
    )
    body = assert_problem(refused, 422, "configuration-error")
    assert "rotation" in body["detail"]

    weights_only = service.post(
        "/v1/quantize", files=upload(tiny_model_file), data={"bits": "8", "dynamic": "true", "rotation": "true"}
    )
    body = assert_problem(weights_only, 400, "input-error")
    assert "rotation" in body["detail"] and "Hugging Face model folder" in body["suggestion"]
