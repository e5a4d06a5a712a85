"""Jobs, artifacts, uploads, idempotency and the operational endpoints, over HTTP."""

from __future__ import annotations

import hashlib
import json

import pytest

from mono_quant import load_model
from tests.app.conftest import assert_problem, upload, wait_for


@pytest.fixture(scope="module")
def finished_job(service, tiny_model_file):
    response = service.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "8", "dynamic": "true"})
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return wait_for(service, response.json()["id"])


def test_job_lifecycle_progress_and_events(service, finished_job):
    assert finished_job["status"] == "succeeded"
    assert finished_job["progress"] == {"stage": "done", "fraction": 1.0}
    assert finished_job["attempt"] == 1
    assert finished_job["started_at"] <= finished_job["finished_at"]
    events = service.get(f"/v1/jobs/{finished_job['id']}/events").json()
    types = [event["type"] for event in events]
    assert types[:2] == ["queued", "running"]
    assert types[-1] == "succeeded"
    stages = [event["data"]["stage"] for event in events if event["type"] == "stage"]
    assert stages == ["load", "quantize", "validate", "save"]


def test_events_as_server_sent_events(service, finished_job):
    response = service.get(f"/v1/jobs/{finished_job['id']}/events", headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block.strip()]
    names = [line.split(": ", 1)[1] for block in blocks for line in block.splitlines() if line.startswith("event:")]
    assert names[0] == "queued" and names[-1] == "succeeded"
    resumed = service.get(
        f"/v1/jobs/{finished_job['id']}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "2"}
    )
    assert "event: queued" not in resumed.text and "event: succeeded" in resumed.text


def test_artifacts_listing_and_download(service, finished_job, tmp_path):
    job_id = finished_job["id"]
    listing = {a["name"]: a for a in service.get(f"/v1/jobs/{job_id}/artifacts").json()}
    assert set(listing) == {"model.safetensors", "report.json"}
    model = listing["model.safetensors"]
    assert model["media_type"] == "application/octet-stream"
    response = service.get(model["url"])
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == model["sha256"]
    assert len(response.content) == model["size"]
    assert response.headers["etag"] == f'"{model["sha256"]}"'
    assert response.headers["accept-ranges"] == "bytes"
    path = tmp_path / "q.safetensors"
    path.write_bytes(response.content)
    assert any(name.endswith("weight") or "int" in name for name in load_model(path))
    report = service.get(listing["report.json"]["url"]).json()
    assert report["model_sha256"] == model["sha256"]
    assert report["info"]["bits"] == 8 and report["validation"]["passed"] is True
    assert set(report["timings"]) >= {"load_s", "quantize_s", "save_s"}


def test_download_ranges_and_conditional_requests(service, finished_job):
    url = f"/v1/jobs/{finished_job['id']}/artifacts/model.safetensors"
    whole = service.get(url)
    etag = whole.headers["etag"]
    part = service.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == whole.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole.content)}"
    assert part.headers["etag"] == etag
    tail = service.get(url, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == whole.content[-16:]
    assert service.get(url, headers={"If-None-Match": etag}).status_code == 304
    stale = service.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == whole.content
    unsatisfiable = service.get(url, headers={"Range": f"bytes={len(whole.content) + 10}-"})
    assert unsatisfiable.status_code == 416
    assert_problem(service.get(url, headers={"Range": "lines=1-2"}), 400, "input-error")
    assert_problem(service.get(f"/v1/jobs/{finished_job['id']}/artifacts/secrets.txt"), 404, "not-found-error")
    assert_problem(
        service.get(f"/v1/jobs/{finished_job['id']}/artifacts/..%2F..%2Fmonoquant.db"), 404, "not-found-error"
    )


def test_client_download_resumes_and_checks_sha256(client, finished_job, tmp_path):
    target = tmp_path / "model.safetensors"
    full = client.download(finished_job["id"], "model.safetensors", target).read_bytes()
    partial = tmp_path / "again.safetensors.part"
    partial.write_bytes(full[:100])
    again = client.download(finished_job["id"], "model.safetensors", tmp_path / "again.safetensors")
    assert again.read_bytes() == full
    assert not partial.exists()


def test_idempotency_key_returns_same_job_and_rejects_other_payload(paused_service, tiny_model_file):
    headers = {"Idempotency-Key": "order-42"}
    first = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "8"}, headers=headers)
    again = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "8"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "4"}, headers=headers)
    body = assert_problem(other, 422, "payload-mismatch-error")
    assert "Idempotency-Key" in body["detail"]
    assert len(paused_service.get("/v1/jobs").json()["items"]) == 1
    assert len(paused_service.get("/v1/models").json()["items"]) == 1


def test_list_jobs_cursor_pagination_and_status_filter(paused_service, tiny_model_file):
    ids = [paused_service.post("/v1/quantize", files=upload(tiny_model_file)).json()["id"] for _ in range(5)]
    paused_service.post(f"/v1/jobs/{ids[0]}/cancel")
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = paused_service.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == list(reversed(ids))
    cancelled = paused_service.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [job["id"] for job in cancelled] == [ids[0]]
    queued = paused_service.get("/v1/jobs", params=[("status", "queued"), ("status", "running")]).json()["items"]
    assert len(queued) == 4
    bad = paused_service.get("/v1/jobs", params={"status": "paused"})
    assert_problem(bad, 422, "configuration-error")


def test_reusable_uploads_by_id(service, tiny_model_file, tmp_path):
    import torch
    from safetensors.torch import save_file

    model = service.post("/v1/models", files={"file": ("tiny.safetensors", tiny_model_file.read_bytes())})
    assert model.status_code == 201
    assert model.json()["sha256"] == hashlib.sha256(tiny_model_file.read_bytes()).hexdigest()
    assert model.json()["format"] == "safetensors" and model.json()["filename"] == "tiny.safetensors"
    data_path = tmp_path / "calibration.safetensors"
    save_file({"input": torch.randn(16, 128)}, str(data_path))
    dataset = service.post("/v1/datasets", files={"file": ("calibration.safetensors", data_path.read_bytes())})
    assert dataset.status_code == 201
    # int4 round-to-nearest uses no calibration data: refused at submission, nothing queued.
    ids = {"model_id": (None, model.json()["id"]), "dataset_id": (None, dataset.json()["id"]), "bits": (None, "4")}
    unused = service.post("/v1/quantize", files={**ids, "method": (None, "rtn")})
    body = assert_problem(unused, 422, "configuration-error")
    assert "does not use it" in body["detail"] and "method=gptq" in body["suggestion"]
    # int4's default (HQQ) would measure input statistics on it, which a weights file cannot run
    no_forward = service.post("/v1/quantize", files=ids)
    assert "has no forward" in assert_problem(no_forward, 400, "input-error")["detail"]
    job = service.post("/v1/quantize", files={"model_id": (None, model.json()["id"]), "bits": (None, "4")})
    assert job.status_code == 202, job.text
    assert job.json()["model_id"] == model.json()["id"]
    assert wait_for(service, job.json()["id"])["status"] == "succeeded"
    assert_problem(
        service.post("/v1/models", files={"file": ("x.zip", b"PK\x05\x06" + b"\0" * 18)}),
        415,
        "unsupported-format-error",
    )
    assert service.delete(f"/v1/models/{model.json()['id']}").status_code == 204
    assert_problem(service.get(f"/v1/models/{model.json()['id']}"), 404, "not-found-error")


def test_cancel_running_job_terminates_its_worker(make_service, slow_job, tiny_model_file):
    with make_service(trusted_inputs=True) as service:
        files, data = slow_job
        job = service.post("/v1/quantize", files=files, data=data).json()
        running = wait_for(service, job["id"], statuses=("running", "succeeded", "failed"), timeout=60)
        assert running["status"] == "running"
        response = service.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202
        assert response.json()["cancel_requested"] is True
        assert wait_for(service, job["id"], timeout=30)["status"] == "cancelled"
        # the pool recovers: the next job still runs
        nxt = service.post("/v1/quantize", files=upload(tiny_model_file)).json()
        assert wait_for(service, nxt["id"])["status"] == "succeeded"


def test_delete_job_removes_it_and_its_files(service, tiny_model_file):
    job = service.post("/v1/quantize", files=upload(tiny_model_file)).json()
    wait_for(service, job["id"])
    storage = service.app.state.context.storage
    assert storage.job_artifact_dir(job["id"]).exists()
    assert service.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert_problem(service.get(f"/v1/jobs/{job['id']}"), 404, "not-found-error")
    assert not storage.job_artifact_dir(job["id"]).exists()


def test_request_id_is_echoed_or_generated(service):
    assert service.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = service.get("/healthz", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32


def test_health_readiness_and_metrics(service, finished_job):
    assert service.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = service.get("/readyz").json()
    assert ready == {"status": "ok", "checks": {"database": True, "queue": True, "storage": True}}
    metrics = service.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'monoquant_jobs{status="succeeded"}' in text
    assert "monoquant_http_requests_total" in text and "monoquant_queue_workers 2.0" in text
    assert 'route="/v1/jobs/{job_id}"' in text  # templates, not raw ids, as labels


def test_openapi_documents_alias_errors_and_examples(service):
    spec = service.get("/openapi.json").json()
    for path in ("/quantize", "/v1/quantize"):
        operation = spec["paths"][path]["post"]
        assert {"202", "400", "413", "415", "422"} <= set(operation["responses"])
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert form["model"]["format"] == "binary" and form["bits"]["enum"] == [4, 8, 16]
    assert spec["components"]["schemas"]["Problem"]["examples"]
    assert spec["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]["409"]
    docs = service.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert json.dumps(spec)  # serialisable as is
