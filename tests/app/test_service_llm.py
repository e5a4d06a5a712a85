"""Real models through the service with text: SmolLM2 (a Llama with tied embeddings) as a
sharded Hugging Face folder, perplexity before/after in the report and a GGUF export; MiniLM
with its tokenizer, embedding cosine in the report."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from tests.app.conftest import upload, wait_for

pytestmark = pytest.mark.slow


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zipped:  # deflate: weights barely compress, ratios stay low
        for path in sorted(folder.iterdir()):
            if path.is_file():
                zipped.write(path, f"model/{path.name}")
    return archive


@pytest.fixture(scope="module")
def smollm2_zip(tmp_path_factory) -> Path:
    from mono_quant.testing import load_smollm2

    model, tokenizer = load_smollm2()
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    return _zip(folder, folder.parent / "smollm2.zip")


def _text(field: str, name: str, text: str) -> dict:
    return {field: (name, text.encode(), "text/plain")}


def _first_paragraphs(text: str, characters: int) -> str:
    """Whole paragraphs of ``text`` up to about ``characters`` (keeps the tests short)."""
    kept, total = [], 0
    for paragraph in text.split("\n\n"):
        if total >= characters:
            break
        kept.append(paragraph)
        total += len(paragraph)
    return "\n\n".join(kept)


@pytest.mark.smollm2
def test_smollm2_sharded_folder_int4_perplexity_and_gguf(make_service, smollm2_zip):
    from mono_quant.testing import eval_text

    with make_service(eval_max_tokens=4 * 128) as service:
        response = service.post(
            "/v1/quantize",
            files={**upload(smollm2_zip), **_text("eval", "eval.txt", _first_paragraphs(eval_text(), 12000))},
            data={"bits": "4", "group_size": "128", "seq_len": "128", "export_formats": "gguf"},
        )
        assert response.status_code == 202, response.text
        job = wait_for(service, response.json()["id"], timeout=900)
        assert job["status"] == "succeeded", job["error"]
        report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
        accuracy = report["accuracy"]
        assert accuracy["windows"] == 4 and accuracy["seq_len"] == 128
        # SmolLM2-135M on Python's reference prose: about 10-30 fp32; int4 g128 (lm_head 8-bit) costs
        # well under 50% more.
        assert 3 < accuracy["perplexity_before"] < 60, accuracy
        assert accuracy["perplexity_before"] < accuracy["perplexity_after"] < 1.5 * accuracy["perplexity_before"]
        assert job["metrics"]["perplexity_before"] == pytest.approx(accuracy["perplexity_before"])
        listing = {a["name"]: a for a in service.get(f"/v1/jobs/{job['id']}/artifacts").json()}
        assert set(listing) == {"model.safetensors", "report.json", "model.gguf"}
        gguf = service.get(listing["model.gguf"]["url"]).content
        assert gguf[:4] == b"GGUF"
        assert hashlib.sha256(gguf).hexdigest() == listing["model.gguf"]["sha256"] == report["exports"][0]["sha256"]


@pytest.mark.smollm2
@pytest.mark.parametrize(
    ("params", "limit"),
    [
        ({"bits": "4", "method": "gptq", "group_size": "128"}, 1.5),
        ({"bits": "8", "dynamic": "true"}, 1.1),  # SmoothQuant from the calibration text
        ({"bits": "8", "dynamic": "true", "rotation": "true"}, 1.1),  # the residual stream rotated first
    ],
    ids=["int4-gptq", "int8-dynamic-smoothquant", "int8-dynamic-rotated"],
)
def test_smollm2_text_calibration(make_service, smollm2_zip, params, limit):
    from mono_quant.testing import calibration_text, eval_text

    with make_service(eval_max_tokens=4 * 128) as service:
        response = service.post(
            "/v1/quantize",
            files={
                **upload(smollm2_zip),
                **_text("calibration", "calibration.txt", _first_paragraphs(calibration_text(), 8000)),
                **_text("eval", "eval.txt", _first_paragraphs(eval_text(), 12000)),
            },
            data={**params, "seq_len": "128"},
        )
        assert response.status_code == 202, response.text
        job = wait_for(service, response.json()["id"], timeout=900)
        assert job["status"] == "succeeded", job["error"]
        report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
        assert report["calibration"]["samples"] >= 8 and report["calibration"]["held_out_windows"] == 0
        assert job["metrics"]["method"] == params.get("method", "rtn")
        assert ("smoothing" in report["library_metrics"]) == (params["bits"] == "8")  # SmoothQuant used the text
        assert ("rotation" in report["library_metrics"]) == ("rotation" in params)
        before, after = report["accuracy"]["perplexity_before"], report["accuracy"]["perplexity_after"]
        assert after < limit * before, report["accuracy"]


@pytest.mark.minilm
def test_minilm_with_tokenizer_and_text_gives_embedding_cosine(make_service, tmp_path):
    from mono_quant.testing import SENTENCES, minilm_dir

    folder = minilm_dir()
    archive = tmp_path / "minilm.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            zipped.write(folder / name, f"all-MiniLM-L6-v2/{name}")
        zipped.write(folder / "special_tokens_map.json", "all-MiniLM-L6-v2/special_tokens_map.json")
    eval_lines = "\n".join(json.dumps({"text": sentence}) for sentence in SENTENCES)
    with make_service() as service:
        response = service.post(
            "/v1/quantize",
            files={**upload(archive), **_text("eval", "eval.jsonl", eval_lines)},
            data={"bits": "8", "dynamic": "true", "seq_len": "32"},
        )
        assert response.status_code == 202, response.text
        job = wait_for(service, response.json()["id"], timeout=600)
        assert job["status"] == "succeeded", job["error"]
        report = service.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
        accuracy = report["accuracy"]
        assert accuracy["documents"] == len(SENTENCES) and accuracy["seq_len"] == 32
        # int8 dynamic MiniLM: mean embedding cosine about 0.997 (tests/app/test_service_minilm.py)
        assert accuracy["embedding_cosine_mean"] > 0.99, accuracy
        assert accuracy["embedding_cosine_min"] > 0.95, accuracy
        assert "perplexity_before" not in accuracy
        assert job["metrics"]["embedding_cosine_mean"] == pytest.approx(accuracy["embedding_cosine_mean"])
