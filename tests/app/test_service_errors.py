"""Every user mistake answers its exact status with a problem+json body, before any job runs."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import pytest
import torch

from tests.app.conftest import assert_problem, upload, wait_for


def _job_count(http) -> int:
    return len(http.get("/v1/jobs", params={"limit": 100}).json()["items"])


@pytest.mark.parametrize(
    ("form", "detail", "in_suggestion"),
    [
        ({"bits": "5"}, "bits=5 is not supported", ["bits=4", "bits=8", "bits=16"]),
        ({"bits": "4", "group_size": "3"}, "group_size must be a power of two from 16 to 1024, got 3", ["128"]),
        ({"layer_types": "linear,foo"}, "unknown layer type(s) ['foo']", ["linear", "embedding"]),
        ({"include": "re:(("}, "invalid regular expression 're:(('", ["glob"]),
        ({"bits": "8", "dynamic": "true", "observer_type": "histogram"}, "observer_type='histogram' is not used", []),
        ({"bits": "8", "dtype": "bf16"}, "dtype='bf16' is not used with", ["bits=16"]),
    ],
    ids=["bits=5", "group_size=3", "layer_types=foo", "bad-regex", "observer-unused", "dtype-needs-16"],
)
def test_library_rules_answer_422_at_submission_with_the_library_suggestion(
    paused_service, tiny_model_file, form, detail, in_suggestion
):
    """QuantizeOptions validates the form: the library's own message and suggestion, nothing queued."""
    response = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data=form)
    body = assert_problem(response, 422, "configuration-error")
    assert body["detail"].startswith(detail)
    for text in in_suggestion:
        assert text in body["suggestion"]
    assert _job_count(paused_service) == 0


def test_invalid_enum_value_is_422_listing_valid_values(paused_service, tiny_model_file):
    response = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"scheme": "foo"})
    body = assert_problem(response, 422, "configuration-error")
    assert [error["loc"] for error in body["errors"]] == [["form", "scheme"]]
    for value in ("symmetric", "asymmetric"):
        assert value in body["suggestion"] and value in body["errors"][0]["msg"]
    assert _job_count(paused_service) == 0


def test_static_without_calibration_is_400(paused_service, tiny_model_file):
    response = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"dynamic": "false"})
    body = assert_problem(response, 400, "input-error")
    assert "calibration" in body["detail"]
    assert "dynamic=true" in body["suggestion"].lower()
    assert _job_count(paused_service) == 0


def test_missing_model_is_422_with_errors(paused_service):
    response = paused_service.post("/v1/quantize", files={"bits": (None, "8")})
    body = assert_problem(response, 422, "configuration-error")
    assert body["errors"][0]["loc"] == ["form", "model"]


@pytest.mark.parametrize(
    "cut",
    [lambda data: data[: len(data) // 2], lambda data: data[:4], lambda data: b"\xff" * 8 + data[8:]],
    ids=["truncated", "too-short", "corrupt-header-length"],
)
def test_corrupt_safetensors_is_400_before_queueing(paused_service, tiny_model_file, cut):
    data = cut(tiny_model_file.read_bytes())
    response = paused_service.post("/v1/quantize", files={"model": ("m.safetensors", data)}, data={"bits": "8"})
    body = assert_problem(response, 400, "input-error")
    assert body["suggestion"]
    assert _job_count(paused_service) == 0
    # nothing of the refused upload stays on disk
    data_dir = paused_service.app.state.context.storage
    assert list(data_dir.blob_dir.iterdir()) == []
    assert list(data_dir.tmp_dir.iterdir()) == []


def _pickled_module() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(128, 64)), buffer)
    return buffer.getvalue()


def _pt2_archive(tmp_path) -> bytes:
    module = torch.nn.Sequential(torch.nn.Linear(8, 4))
    program = torch.export.export(module, (torch.randn(2, 8),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    return path.read_bytes()


def test_pickled_module_is_415(paused_service):
    response = paused_service.post("/v1/quantize", files={"model": ("m.pt", _pickled_module())})
    body = assert_problem(response, 415, "unsupported-format-error")
    assert "safetensors" in body["suggestion"]
    assert _job_count(paused_service) == 0


@pytest.mark.slow
def test_pt2_archive_is_415(paused_service, tmp_path):
    response = paused_service.post("/v1/quantize", files={"model": ("m.pt2", _pt2_archive(tmp_path))})
    body = assert_problem(response, 415, "unsupported-format-error")
    assert "safetensors" in body["suggestion"]


def test_raw_pickle_of_arbitrary_object_is_415(paused_service):
    payload = pickle.dumps({"weight": object()}, protocol=2)
    response = paused_service.post("/v1/quantize", files={"model": ("m.pkl", payload)})
    assert_problem(response, 415, "unsupported-format-error")


def test_unknown_format_is_415(paused_service):
    response = paused_service.post("/v1/quantize", files={"model": ("m.onnx", b"\x08\x07ONNX-ish bytes" * 10)})
    assert_problem(response, 415, "unsupported-format-error")


def test_trusted_inputs_accept_and_run_a_pickled_module(make_service):
    with make_service(trusted_inputs=True) as http:
        response = http.post("/v1/quantize", files={"model": ("m.pt", _pickled_module())}, data={"bits": "8"})
        assert response.status_code == 202, response.text
        assert http.get(f"/v1/models/{response.json()['model_id']}").json()["format"] == "torch_zip"
        job = wait_for(http, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["metrics"]["selected_layers"] == 1


def test_oversize_upload_is_413(make_service, tiny_model_file):
    with make_service(max_upload_bytes=10_000) as http:
        response = http.post("/v1/quantize", files=upload(tiny_model_file), data={"bits": "8"})
        body = assert_problem(response, 413, "input-too-large-error")
        assert "MONOQUANT_MAX_UPLOAD_BYTES" in body["suggestion"]
        assert http.get("/v1/jobs").json()["items"] == []


def test_oversize_upload_without_content_length_is_413_while_streaming(make_service, tiny_model_file):
    """A chunked body (no Content-Length) is refused at the limit, and its partial file removed."""
    with make_service(max_upload_bytes=10_000) as http:
        boundary = "xyz"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m"\r\n\r\n'.encode()

        def body():
            yield head
            for _ in range(1000):
                yield b"\0" * 1000

        response = http.post(
            "/v1/quantize", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert_problem(response, 413, "input-too-large-error")
        storage = http.app.state.context.storage
        assert list(storage.tmp_dir.iterdir()) == []


def test_not_multipart_is_415(paused_service):
    response = paused_service.post("/v1/quantize", json={"bits": 8})
    body = assert_problem(response, 415, "unsupported-format-error")
    assert "multipart/form-data" in body["suggestion"]


def test_unknown_job_is_404(paused_service):
    for path in ("/v1/jobs/00000000-0000-0000-0000-000000000000", "/v1/jobs/not-a-uuid"):
        assert_problem(paused_service.get(path), 404, "not-found-error")


def test_unknown_model_id_is_404(paused_service):
    response = paused_service.post("/v1/quantize", files={"model_id": (None, "00000000-0000-0000-0000-000000000000")})
    assert_problem(response, 404, "not-found-error")


def test_artifacts_before_success_are_409(paused_service, tiny_model_file):
    job = paused_service.post("/v1/quantize", files=upload(tiny_model_file)).json()
    assert job["status"] == "queued"
    body = assert_problem(paused_service.get(f"/v1/jobs/{job['id']}/artifacts"), 409, "conflict-error")
    assert "succeeded" in body["suggestion"]
    response = paused_service.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors")
    assert_problem(response, 409, "conflict-error")


def test_cancel_queued_then_cancel_again_is_409(paused_service, tiny_model_file):
    job = paused_service.post("/v1/quantize", files=upload(tiny_model_file)).json()
    cancelled = paused_service.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    body = assert_problem(paused_service.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict-error")
    assert "already cancelled" in body["detail"]


def test_cancel_finished_job_is_409(service, tiny_model_file):
    job = service.post("/v1/quantize", files=upload(tiny_model_file)).json()
    assert wait_for(service, job["id"])["status"] == "succeeded"
    body = assert_problem(service.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict-error")
    assert "already succeeded" in body["detail"]


def test_job_failing_inside_the_worker_fails_with_the_error_body(service, tiny_model_file, tmp_path):
    """The upload checks pass (a zip with config.json and valid weights), but the worker cannot
    build the architecture: the job fails with the library's error type, message and suggestion."""
    archive = tmp_path / "folder.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("config.json", json.dumps({"model_type": "no-such-architecture"}))
        zipped.write(tiny_model_file, "model.safetensors")
    response = service.post("/v1/quantize", files={"model": ("folder.zip", archive.read_bytes())})
    assert response.status_code == 202, response.text
    job = wait_for(service, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["type"] == "InputError"
    assert "config.json" in job["error"]["message"]
    assert job["error"]["suggestion"]
    assert_problem(service.get(f"/v1/jobs/{job['id']}/artifacts"), 409, "conflict-error")


def test_unknown_form_field_is_422(paused_service, tiny_model_file):
    response = paused_service.post("/v1/quantize", files=upload(tiny_model_file), data={"bitz": "8"})
    body = assert_problem(response, 422, "configuration-error")
    assert body["errors"][0]["loc"] == ["form", "bitz"]


def test_query_validation_uses_the_same_problem_shape(paused_service):
    body = assert_problem(paused_service.get("/v1/jobs", params={"limit": 0}), 422, "configuration-error")
    assert body["errors"][0]["loc"] == ["query", "limit"]


class TestAuth:
    @pytest.fixture
    def keyed(self, make_service):
        with make_service(api_keys="key-alice,key-bob") as http:
            yield http

    def test_missing_key_is_401(self, keyed):
        body = assert_problem(keyed.get("/v1/jobs"), 401, "authentication-error")
        assert "Authorization: Bearer" in body["suggestion"]
        assert keyed.get("/v1/jobs").headers["www-authenticate"].startswith("Bearer")

    def test_bad_key_is_401(self, keyed):
        response = keyed.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        assert_problem(response, 401, "authentication-error")

    def test_health_needs_no_key(self, keyed):
        assert keyed.get("/healthz").status_code == 200

    def test_another_keys_resources_are_404(self, keyed, tiny_model_file):
        alice = {"Authorization": "Bearer key-alice"}
        bob = {"Authorization": "Bearer key-bob"}
        job = keyed.post("/v1/quantize", files=upload(tiny_model_file), headers=alice)
        assert job.status_code == 202
        job_id, model_id = job.json()["id"], job.json()["model_id"]
        assert keyed.get(f"/v1/jobs/{job_id}", headers=alice).status_code == 200
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("DELETE", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("GET", f"/v1/jobs/{job_id}/artifacts"),
            ("GET", f"/v1/models/{model_id}"),
        ]:
            assert_problem(keyed.request(method, path, headers=bob), 404, "not-found-error")
        assert keyed.get("/v1/jobs", headers=bob).json()["items"] == []
        # Bob cannot quantize Alice's upload by id either.
        response = keyed.post("/v1/quantize", files={"model_id": (None, model_id)}, headers=bob)
        assert_problem(response, 404, "not-found-error")
