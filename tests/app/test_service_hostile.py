"""Hostile input: bombs, corrupt files, a full disk, odd HTTP headers, other tenants' ids.

Each case answers an exact status with a problem+json body (with a suggestion), keeps the
server's memory and disk bounded, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import time
import uuid
import zipfile

import pytest

import app.storage as storage_module
from app.jobs.store import ArtifactRow, JobRow
from tests.app.conftest import assert_problem, tiny_state_dict

_KEYS = {"api_keys": "tenant-a,tenant-b"}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _header_bytes(entries: dict) -> bytes:
    return json.dumps(entries).encode()


def _safetensors(raw_header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw_header)) + raw_header + data


def _f32(begin: int, end: int, shape: list) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _post_model(http, name: str, data: bytes, **kwargs):
    return http.post("/v1/quantize", files={"model": (name, data)}, data={"bits": "8"}, **kwargs)


def _nothing_left(http) -> None:
    storage = http.app.state.context.storage
    assert list(storage.blob_dir.iterdir()) == []
    assert list(storage.tmp_dir.iterdir()) == []
    assert http.get("/v1/jobs").json()["items"] == []


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_bomb(tensor_bytes: int) -> bytes:
    """A model zip whose safetensors member declares one tensor of ``tensor_bytes`` zeros:
    a valid file, about 1000x smaller zipped."""
    header = _header_bytes({"w": _f32(0, tensor_bytes, [tensor_bytes // 4])})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps({"model_type": "bert"}))
        with archive.open("model.safetensors", "w", force_zip64=True) as member:
            member.write(struct.pack("<Q", len(header)) + header)
            zeros = bytes(16 * 1024 * 1024)
            for _ in range(tensor_bytes // len(zeros)):
                member.write(zeros)
    return buffer.getvalue()


# -- bombs ---------------------------------------------------------------------------------------
def test_zip_bomb_is_413_at_submission(paused_service):
    bomb = _zip_bomb(256 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    response = _post_model(paused_service, "bomb.zip", bomb)
    body = assert_problem(response, 413, "input-too-large-error")
    assert body["detail"].startswith("model.safetensors in the zip expands ")
    assert "more than the limit of 100x" in body["detail"]
    assert "zip bomb" in body["detail"]
    assert "zip -0" in body["suggestion"]
    _nothing_left(paused_service)


def test_zip_of_too_many_entries_is_413(paused_service, tiny_model_file):
    members = {"config.json": b'{"model_type": "bert"}', "model.safetensors": tiny_model_file.read_bytes()}
    members.update({f"junk/{i:05d}": b"" for i in range(1500)})
    response = _post_model(paused_service, "crowded.zip", _zip(members))
    body = assert_problem(response, 413, "input-too-large-error")
    assert body["detail"] == "the zip has 1502 entries, more than the limit of 1000"
    assert "MONOQUANT_MAX_ZIP_MEMBERS" in body["suggestion"]
    _nothing_left(paused_service)


def test_extraction_stops_at_the_job_write_limit(tmp_path):
    from app.config import Settings
    from app.inputs import extract_model_zip

    weights = _safetensors(_header_bytes({"w": _f32(0, 4096, [1024])}), bytes(4096))
    archive = tmp_path / "model.zip"
    archive.write_bytes(_zip({"config.json": b'{"model_type": "bert"}', "model.safetensors": weights}))
    settings = Settings(data_dir=tmp_path, max_job_write_bytes=2048)
    destination = tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        extract_model_zip(archive, destination, settings)
    assert type(excinfo.value).__name__ == "InputTooLargeError"
    assert excinfo.value.message == f"the zip expands to {len(weights) + 22} bytes, more than the limit of 2048"
    assert not destination.exists()  # the partial folder is gone
    extract_model_zip(archive, destination, Settings(data_dir=tmp_path))
    assert (destination / "model.safetensors").read_bytes() == weights


def test_header_of_many_empty_tensors_is_400_before_parsing_it_all(make_paused_service):
    header = _header_bytes({f"t{i}": _f32(0, 0, [0]) for i in range(2000)})
    with make_paused_service(max_safetensors_tensors=1000) as http:
        response = _post_model(http, "many.safetensors", _safetensors(header))
        body = assert_problem(response, 400, "input-error")
        assert body["detail"] == (
            "many.safetensors is not a valid safetensors file: the header declares more than 1000 tensors (the limit)"
        )
        assert "Re-export" in body["suggestion"]
        _nothing_left(http)
    with make_paused_service(max_safetensors_header_bytes=10_000) as http:
        response = _post_model(http, "many.safetensors", _safetensors(header))
        body = assert_problem(response, 400, "input-error")
        assert body["detail"] == (
            f"many.safetensors is not a valid safetensors file: header length {len(header)} is over the limit "
            "of 10000 bytes"
        )


@pytest.mark.slow
def test_the_101_mb_header_of_1_7_million_tensors_is_400(paused_service):
    """The case found against a real server: refused from its length, nothing parsed."""
    entry = b'{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = b"{" + b",".join(b'"t%07d":%s' % (i, entry) for i in range(1_700_000)) + b"}"
    assert len(header) > 100_000_000
    response = _post_model(paused_service, "huge-header.safetensors", _safetensors(header))
    body = assert_problem(response, 400, "input-error")
    assert body["detail"] == (
        f"huge-header.safetensors is not a valid safetensors file: header length {len(header)} is over the "
        f"limit of {16 * 1024 * 1024} bytes"
    )
    _nothing_left(paused_service)


# -- corrupt files -------------------------------------------------------------------------------
_DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
CORRUPT_HEADERS = {
    "duplicate-tensor-name": (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        8,
        "the key 'a' appears twice in the header",
    ),
    "hole-in-offsets": (
        _header_bytes({"a": _f32(0, 4, [1]), "b": _f32(8, 12, [1])}),
        12,
        "4 bytes after tensor 'a' belong to no tensor (a hole in data_offsets)",
    ),
    "overlapping-offsets": (
        _header_bytes({"a": _f32(0, 8, [2]), "b": _f32(4, 12, [2])}),
        12,
        "tensors 'a' and 'b' overlap",
    ),
    "true-in-shape": (_header_bytes({"a": _f32(0, 4, [True])}), 4, "tensor 'a' has an invalid shape [True]"),
    "shape-disagrees-with-offsets": (
        _header_bytes({"a": _f32(0, 8, [4])}),
        8,
        "tensor 'a': 8 bytes for shape [4] of F32",
    ),
    "deeply-nested": (_DEEP, 8, "the header nests JSON deeper than a safetensors header can"),
}


@pytest.mark.parametrize(("header", "data_size", "problem"), list(CORRUPT_HEADERS.values()), ids=list(CORRUPT_HEADERS))
def test_corrupt_safetensors_is_400_naming_the_upload(paused_service, header, data_size, problem):
    response = _post_model(paused_service, "mine.safetensors", _safetensors(header, bytes(data_size)))
    body = assert_problem(response, 400, "input-error")
    assert body["detail"] == f"mine.safetensors is not a valid safetensors file: {problem}"
    assert "Re-export" in body["suggestion"]
    _nothing_left(paused_service)


@pytest.mark.parametrize(("header", "data_size", "problem"), list(CORRUPT_HEADERS.values()), ids=list(CORRUPT_HEADERS))
def test_corrupt_safetensors_inside_a_zip_is_400(paused_service, header, data_size, problem):
    archive = _zip(
        {"config.json": b'{"model_type": "bert"}', "model.safetensors": _safetensors(header, bytes(data_size))}
    )
    response = _post_model(paused_service, "folder.zip", archive)
    body = assert_problem(response, 400, "input-error")
    assert body["detail"] == f"model.safetensors in the zip is not a valid safetensors file: {problem}"
    _nothing_left(paused_service)


def test_deeply_nested_config_json_is_400(paused_service, tiny_model_file):
    deep = b'{"model_type": "bert", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    archive = _zip({"config.json": deep, "model.safetensors": tiny_model_file.read_bytes()})
    response = _post_model(paused_service, "folder.zip", archive)
    body = assert_problem(response, 400, "input-error")
    assert body["detail"] == "config.json nests objects or arrays too deeply to be a model config"
    assert "save_pretrained" in body["suggestion"]
    _nothing_left(paused_service)


def test_errors_raised_while_reading_a_blob_name_the_uploaded_file(tmp_path):
    from app.inputs import named_for_the_user
    from mono_quant.io.handlers import read_safetensors_header

    blob = tmp_path / uuid.uuid4().hex
    blob.write_bytes(_safetensors(_header_bytes({"a": _f32(0, 4, [True])}), bytes(4)))
    with pytest.raises(Exception) as excinfo, named_for_the_user(blob, "my-model.safetensors"):
        read_safetensors_header(blob)
    assert (
        excinfo.value.message
        == "my-model.safetensors is not a valid safetensors file: tensor 'a' has an invalid shape [True]"
    )
    assert blob.name not in str(excinfo.value)


# -- a full disk ---------------------------------------------------------------------------------
class _DiskWithRoom:
    """A write handle that fails with ENOSPC once ``room`` bytes were written."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def test_disk_full_is_507_removes_the_partial_file_and_keeps_serving(paused_service, monkeypatch, tiny_model_file):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return _DiskWithRoom(handle, room=64 * 1024) if "w" in mode else handle

    monkeypatch.setattr(storage_module, "open", full_disk_open, raising=False)
    files = {"file": ("tiny.safetensors", tiny_model_file.read_bytes())}
    response = paused_service.post("/v1/models", files=files)
    body = assert_problem(response, 507, "insufficient-storage-error")
    assert body["detail"] == "the server's storage is full (No space left on device); nothing was kept"
    assert "free space" in body["suggestion"]
    storage = paused_service.app.state.context.storage
    assert list(storage.tmp_dir.iterdir()) == []
    assert list(storage.blob_dir.iterdir()) == []

    monkeypatch.undo()
    assert paused_service.post("/v1/models", files=files).status_code == 201


# -- partial writes of dead processes --------------------------------------------------------------
def test_partial_writes_of_dead_processes_are_swept_at_start_and_periodically(make_service, tmp_path):
    overrides = {"temp_max_age_s": 60, "temp_sweep_interval_s": 0.1}
    with make_service(**overrides) as http:
        storage = http.app.state.context.storage
        left = storage.temp_path()
        left.write_bytes(b"half an upload, its writer killed with -9")
        long_ago = time.time() - 3600
        os.utime(left, (long_ago, long_ago))
        fresh = storage.temp_path()
        fresh.write_bytes(b"an upload still being written")
        deadline = time.monotonic() + 10
        while left.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left.exists()
        assert fresh.exists()


def test_partial_writes_are_swept_at_start(tmp_path):
    from app.context import ServiceContext
    from tests.app.conftest import settings_for

    context = ServiceContext.build(settings_for(tmp_path, temp_max_age_s=60))
    context.storage.ensure()
    left = context.storage.temp_path()
    left.write_bytes(b"half")
    os.utime(left, (time.time() - 120, time.time() - 120))
    assert context.sweep_partial_writes() == 1
    assert not left.exists()
    context.store.dispose()


# -- HTTP details of downloads --------------------------------------------------------------------
def _succeeded_job(http, owner: str = "open", content: bytes = b"0123456789" * 100) -> tuple[str, str]:
    """A succeeded job with one artifact (report.json), written straight to the store."""
    context = http.app.state.context
    job = context.store.add_job(JobRow(id=str(uuid.uuid4()), owner=owner, params={}))
    attempt = context.store.claim(job.id, "host-of-the-worker:4242")
    stored = context.storage.write_bytes(context.storage.artifact_path(job.id, "report.json"), content)
    artifact = ArtifactRow(
        job_id=job.id, name="report.json", size=stored.size, sha256=stored.sha256, media_type="application/json"
    )
    assert context.store.finish(job.id, "succeeded", attempt=attempt, metrics={}, artifacts=[artifact])
    return job.id, stored.sha256


@pytest.mark.parametrize(
    ("range_header", "status", "detail"),
    [
        ("bytes=100-50", 416, "range '100-50' ends before it starts"),
        ("bytes=5000-", 416, "range '5000-' is outside the file (1000 bytes)"),
        ("bytes=-0", 416, "range '-0' is outside the file (1000 bytes)"),
        ("bytes=0-10,900-800", 416, "range '900-800' ends before it starts"),
        ("bytes=-", 400, "malformed Range header 'bytes=-'"),
        ("items=0-10", 400, "malformed Range header 'items=0-10'"),
    ],
)
def test_bad_ranges_are_problem_json(paused_service, range_header, status, detail):
    job_id, _ = _succeeded_job(paused_service)
    response = paused_service.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers={"Range": range_header})
    body = assert_problem(response, status, "range-not-satisfiable-error" if status == 416 else "input-error")
    assert body["detail"] == detail
    assert "bytes=0-1023" in body["suggestion"]
    if status == 416:
        assert response.headers["content-range"] == "bytes */1000"


def test_good_ranges_still_206(paused_service):
    job_id, _ = _succeeded_job(paused_service)
    url = f"/v1/jobs/{job_id}/artifacts/report.json"
    response = paused_service.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == b"0123456789"
    assert response.headers["content-range"] == "bytes 10-19/1000"
    assert paused_service.get(url, headers={"Range": "bytes=-5"}).content == b"56789"


@pytest.mark.parametrize(
    "validator",
    ['"{sha}"', 'W/"{sha}"', '"other", W/"{sha}"', "*", ' "nope" , "{sha}" '],
    ids=["strong", "weak", "list-with-weak", "star", "list-with-spaces"],
)
def test_if_none_match_accepts_weak_validators_lists_and_star(paused_service, validator):
    job_id, sha = _succeeded_job(paused_service)
    url = f"/v1/jobs/{job_id}/artifacts/report.json"
    response = paused_service.get(url, headers={"If-None-Match": validator.format(sha=sha)})
    assert response.status_code == 304
    assert response.headers["etag"] == f'"{sha}"'
    assert response.content == b""
    assert paused_service.get(url, headers={"If-None-Match": '"other", W/"also-other"'}).status_code == 200


def test_head_on_artifacts_and_health(paused_service):
    job_id, sha = _succeeded_job(paused_service)
    response = paused_service.head(f"/v1/jobs/{job_id}/artifacts/report.json")
    assert response.status_code == 200
    assert response.headers["content-length"] == "1000"
    assert response.headers["etag"] == f'"{sha}"'
    assert response.content == b""
    assert paused_service.head("/healthz").status_code == 200
    # not ready: this service's worker pool is not running; HEAD answers what GET does
    assert paused_service.head("/readyz").status_code == paused_service.get("/readyz").status_code == 503
    missing = paused_service.head(f"/v1/jobs/{uuid.uuid4()}/artifacts/report.json")
    assert missing.status_code == 404
    assert missing.content == b""


# -- other tenants -------------------------------------------------------------------------------
def test_a_cursor_naming_another_keys_job_is_an_unknown_cursor(make_paused_service, tiny_model_file):
    with make_paused_service(**_KEYS) as http:
        for _ in range(3):
            assert (
                _post_model(http, "m.safetensors", tiny_model_file.read_bytes(), headers=_auth("tenant-a")).status_code
                == 202
            )
        other = _post_model(http, "m.safetensors", tiny_model_file.read_bytes(), headers=_auth("tenant-b")).json()["id"]
        page = "/v1/jobs?limit=2&after={}"
        unknown = http.get(page.format(uuid.uuid4()), headers=_auth("tenant-a"))
        foreign = http.get(page.format(other), headers=_auth("tenant-a"))
        assert unknown.status_code == foreign.status_code == 200
        assert foreign.json() == unknown.json()
        uploads = "/v1/models?limit=2&after={}"
        model_b = http.get("/v1/models", headers=_auth("tenant-b")).json()["items"][0]["id"]
        assert (
            http.get(uploads.format(model_b), headers=_auth("tenant-a")).json()
            == http.get(uploads.format(uuid.uuid4()), headers=_auth("tenant-a")).json()
        )


def test_metrics_need_the_operator_key_when_keys_are_on(make_paused_service):
    with make_paused_service(**_KEYS) as http:
        body = assert_problem(http.get("/metrics", headers=_auth("tenant-a")), 401, "authentication-error")
        assert body["detail"] == "metrics need the operator's metrics key, and none is configured"
        assert "MONOQUANT_METRICS_KEY" in body["suggestion"]
    with make_paused_service(**_KEYS, metrics_key="scraper") as http:
        body = assert_problem(http.get("/metrics", headers=_auth("tenant-a")), 401, "authentication-error")
        assert body["detail"] == "missing or invalid metrics key"
        assert_problem(http.get("/metrics"), 401, "authentication-error")
        response = http.get("/metrics", headers=_auth("scraper"))
        assert response.status_code == 200
        assert "monoquant_jobs" in response.text
        assert_problem(http.get("/v1/jobs", headers=_auth("scraper")), 401, "authentication-error")
    with make_paused_service() as http:
        assert http.get("/metrics").status_code == 200


def test_events_do_not_show_which_host_and_pid_ran_the_job(paused_service):
    job_id, _ = _succeeded_job(paused_service)
    events = paused_service.get(f"/v1/jobs/{job_id}/events").json()
    running = next(event for event in events if event["type"] == "running")
    assert running["data"] == {"attempt": 1}
    assert "host-of-the-worker" not in json.dumps(events)
    stored = paused_service.app.state.context.store.events(job_id)
    assert next(e for e in stored if e.type == "running").data["worker"] == "host-of-the-worker:4242"


def test_valid_uploads_still_pass(paused_service, tmp_path):
    """The strict checks refuse only what is wrong: a real file, zipped or not, is accepted."""
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file(tiny_state_dict(), str(path))
    assert _post_model(paused_service, "ok.safetensors", path.read_bytes()).status_code == 202
    archive = _zip({"config.json": b'{"model_type": "bert"}', "model.safetensors": path.read_bytes()})
    assert _post_model(paused_service, "ok.zip", archive).status_code == 202
    stored = _zip(
        {"config.json": b'{"model_type": "bert"}', "model.safetensors": path.read_bytes()}, zipfile.ZIP_STORED
    )
    assert _post_model(paused_service, "stored.zip", stored).status_code == 202


def test_a_worker_error_names_the_uploaded_file_not_its_blob(make_service, tiny_model_file):
    """A stored upload damaged after its checks (a disk fault): the job fails naming the file."""
    with make_service() as http:
        model = http.post("/v1/models", files={"file": ("my-model.safetensors", tiny_model_file.read_bytes())}).json()
        blob = http.app.state.context.storage.blob_path(model["id"])
        blob.write_bytes(_safetensors(_header_bytes({"a": _f32(0, 4, [True])}), bytes(4)))
        form = {"model_id": (None, model["id"]), "bits": (None, "8"), "dynamic": (None, "true")}
        job = http.post("/v1/quantize", files=form).json()
        deadline = time.monotonic() + 120
        while (job := http.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "InputError"
    assert job["error"]["message"] == (
        "my-model.safetensors is not a valid safetensors file: tensor 'a' has an invalid shape [True]"
    )
    assert blob.name not in json.dumps(job)
