"""End to end over HTTP on all-MiniLM-L6-v2: upload -> job -> download -> load_quantized ->
sentence embeddings compared with fp32 by cosine similarity."""

from __future__ import annotations

import zipfile

import pytest
from safetensors.torch import save_file

from app.client import MonoQuantClient
from mono_quant import load_quantized
from mono_quant.testing import cosine_stats, embed, load_minilm, minilm_dir, tokenize

pytestmark = [pytest.mark.slow, pytest.mark.minilm]


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer)
    return model, batch, embed(model, batch)


def _skeleton(from_raw_checkpoint: bool):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig.from_pretrained(str(minilm_dir()))).eval()
    if from_raw_checkpoint:
        # The packaged checkpoint carries embeddings.position_ids, which current transformers
        # keeps as a non-persistent buffer; load_quantized is strict about extra keys, so a
        # file quantized from the raw checkpoint needs it persistent. (A model the worker built
        # with transformers does not save it.)
        embeddings = model.embeddings
        embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)
    return model


def _cosine_after_download(
    client: MonoQuantClient, job_id: str, tmp_path, minilm, from_raw_checkpoint: bool = True
) -> dict[str, float]:
    _, batch, reference = minilm
    path = client.download(job_id, "model.safetensors", tmp_path / f"{job_id}.safetensors")
    quantized = load_quantized(path, _skeleton(from_raw_checkpoint))
    return cosine_stats(reference, embed(quantized, batch))


@pytest.mark.parametrize(
    ("params", "floor"),
    [({"bits": 8, "dynamic": True}, 0.997), ({"bits": 4, "group_size": 128}, 0.96)],
    ids=["int8-dynamic", "int4-group128"],
)
def test_minilm_safetensors_end_to_end(client, minilm, tmp_path, params, floor):
    job = client.submit(minilm_dir() / "model.safetensors", **params)
    assert job["status"] in ("queued", "running")
    job = client.wait(job["id"], timeout=300)
    assert job["metrics"]["bits"] == params["bits"]
    assert job["metrics"]["selected_layers"] > 30
    cosine = _cosine_after_download(client, job["id"], tmp_path, minilm)
    assert cosine["mean"] >= floor, cosine


def test_minilm_zipped_folder_static_int8_with_calibration(client, minilm, tmp_path):
    _, batch, _ = minilm
    folder = minilm_dir()
    archive = tmp_path / "minilm.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(folder / "config.json", "all-MiniLM-L6-v2/config.json")
        zipped.write(folder / "model.safetensors", "all-MiniLM-L6-v2/model.safetensors")
        zipped.write(folder / "vocab.txt", "all-MiniLM-L6-v2/vocab.txt")  # ignored by the worker
    calibration = tmp_path / "calibration.safetensors"
    save_file(
        {"input_ids": batch["input_ids"].contiguous(), "attention_mask": batch["attention_mask"].contiguous()},
        str(calibration),
    )
    job = client.submit(archive, calibration=calibration, bits=8, dynamic=False, observer_type="histogram")
    job = client.wait(job["id"], timeout=300)
    assert job["metrics"]["mode"] == "static"
    # Validation ran the float and the quantized model on calibration rows.
    assert job["metrics"]["output_cosine"] > 0.9
    report = client.request("GET", f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["info"]["calibration_samples_used"] == batch["input_ids"].shape[0]
    assert report["validation"]["output_sqnr_db"] is not None
    cosine = _cosine_after_download(client, job["id"], tmp_path, minilm, from_raw_checkpoint=False)
    assert cosine["mean"] >= 0.98, cosine
