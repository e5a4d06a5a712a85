"""JobStore's transitions (each a conditional update) and the lifecycle rules both queues use."""

from __future__ import annotations

import uuid

import pytest

from app.config import Settings
from app.jobs.lifecycle import fail_timed_out, recover_lost_job
from app.jobs.store import ArtifactRow, BlobRow, JobRow, JobStore


@pytest.fixture
def store(tmp_path) -> JobStore:
    job_store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_store.create_all()
    yield job_store
    job_store.dispose()


def _queued(store: JobStore, owner: str = "open") -> str:
    return store.add_job(JobRow(id=str(uuid.uuid4()), owner=owner, params={})).id


def _events(store: JobStore, job_id: str) -> list[str]:
    return [event.type for event in store.events(job_id)]


def test_claim_runs_a_queued_job_once(store):
    job_id = _queued(store)
    assert store.claim(job_id, "host:1") == 1
    assert store.claim(job_id, "host:2") is None  # already running: a redelivery does nothing
    job = store.get_job(job_id)
    assert (job.status, job.attempt, job.worker) == ("running", 1, "host:1")
    assert _events(store, job_id) == ["queued", "running"]
    assert store.claim(str(uuid.uuid4()), "host:1") is None


def test_writes_of_a_replaced_attempt_match_nothing(store):
    job_id = _queued(store)
    first = store.claim(job_id, "host:1")
    assert store.requeue(job_id, "its worker process is gone; retrying")
    second = store.claim(job_id, "host:2")
    assert second == first + 1
    assert store.set_progress(job_id, first, "quantize", 0.5, new_stage=True) is False
    assert store.finish(job_id, "succeeded", attempt=first) is False
    assert store.set_progress(job_id, second, "quantize", 0.5, new_stage=True) is True
    artifact = ArtifactRow(job_id=job_id, name="report.json", size=2, sha256="0" * 64, media_type="application/json")
    assert store.finish(job_id, "succeeded", attempt=second, metrics={"bits": 8}, artifacts=[artifact]) is True
    job = store.get_job(job_id)
    assert (job.status, job.progress_stage, job.progress_fraction, job.metrics) == (
        "succeeded",
        "done",
        1.0,
        {"bits": 8},
    )
    assert [a.name for a in store.artifacts(job_id)] == ["report.json"]
    assert _events(store, job_id) == ["queued", "running", "requeued", "running", "stage", "succeeded"]


def test_a_finished_job_stays_finished(store):
    job_id = _queued(store)
    attempt = store.claim(job_id, "host:1")
    assert store.finish(job_id, "failed", attempt=attempt, error={"type": "X", "message": "m", "suggestion": "s"})
    assert store.finish(job_id, "succeeded", attempt=attempt) is False
    assert store.requeue(job_id, "late") is False
    assert store.request_cancel(job_id) == "failed"
    assert store.get_job(job_id).status == "failed"
    with pytest.raises(ValueError, match="not a terminal status: running"):
        store.finish(job_id, "running")


def test_cancel_queued_at_once_running_by_flag(store):
    queued = _queued(store)
    assert store.request_cancel(queued) == "cancelled"
    assert store.claim(queued, "host:1") is None
    running = _queued(store)
    store.claim(running, "host:1")
    assert store.request_cancel(running) == "running"
    assert store.cancel_requested(running) is True
    assert store.get_job(running).status == "running"  # its worker ends it
    assert store.request_cancel(str(uuid.uuid4())) is None
    assert store.cancel_requested(str(uuid.uuid4())) is True  # a deleted job counts as cancelled


def test_delete_removes_the_job_its_events_and_artifacts(store):
    job_id = _queued(store)
    attempt = store.claim(job_id, "host:1")
    artifact = ArtifactRow(job_id=job_id, name="report.json", size=2, sha256="0" * 64, media_type="application/json")
    store.finish(job_id, "succeeded", attempt=attempt, artifacts=[artifact])
    store.delete_job(job_id)
    assert store.get_job(job_id) is None
    assert store.events(job_id) == [] and store.artifacts(job_id) == []


def test_jobs_are_listed_per_owner_and_cursors_are_owner_scoped(store):
    mine = [_queued(store, "a") for _ in range(3)]
    theirs = _queued(store, "b")
    assert [job.id for job in store.list_jobs("a", 10, None, None)] == mine[::-1]
    assert [job.id for job in store.list_jobs("a", 10, mine[2], None)] == mine[1::-1]
    ids = [job.id for job in store.list_jobs("a", 10, theirs, None)]
    assert ids == [job.id for job in store.list_jobs("a", 10, "unknown", None)] == mine[::-1]
    assert store.get_job(theirs, "a") is None


# -- the rules both queues apply ------------------------------------------------------------------
def _running(store: JobStore, attempt_to: int) -> JobRow:
    job_id = _queued(store)
    store.claim(job_id, "host:1")
    for _ in range(attempt_to - 1):
        store.requeue(job_id, "lost")
        store.claim(job_id, "host:1")
    return store.get_job(job_id)


def test_a_lost_job_is_queued_again_while_attempts_are_left(store, tmp_path):
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    job = _running(store, attempt_to=1)
    assert recover_lost_job(settings, store, job, "its worker process is gone") == "queued"
    assert store.get_job(job.id).status == "queued"
    assert store.events(job.id)[-1].data == {"reason": "its worker process is gone; retrying"}


def test_a_lost_job_on_its_last_attempt_fails_with_worker_lost(store, tmp_path):
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    job = _running(store, attempt_to=2)
    assert recover_lost_job(settings, store, job, "its worker process is gone") == "failed"
    failed = store.get_job(job.id)
    assert failed.status == "failed"
    assert failed.error["type"] == "WorkerLost"
    assert failed.error["message"] == "the job was interrupted: its worker process is gone, after 2 attempt(s)"
    assert "Submit the job again" in failed.error["suggestion"]


def test_a_lost_job_that_was_being_cancelled_ends_cancelled(store, tmp_path):
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    job = _running(store, attempt_to=1)
    store.request_cancel(job.id)
    assert recover_lost_job(settings, store, store.get_job(job.id), "gone") == "cancelled"
    assert store.get_job(job.id).status == "cancelled"


def test_recovery_leaves_a_job_that_is_no_longer_running(store, tmp_path):
    settings = Settings(data_dir=tmp_path)
    job = _running(store, attempt_to=1)
    store.finish(job.id, "succeeded", attempt=job.attempt)
    assert recover_lost_job(settings, store, store.get_job(job.id), "gone") == "unchanged"
    assert store.get_job(job.id).status == "succeeded"


def test_a_job_past_its_time_limit_fails_with_job_timeout(store, tmp_path):
    settings = Settings(data_dir=tmp_path, job_timeout_s=90)
    job = _running(store, attempt_to=1)
    assert fail_timed_out(settings, store, job) is True
    failed = store.get_job(job.id)
    assert failed.error == {
        "type": "JobTimeout",
        "message": "the job ran longer than 90 s and was stopped",
        "suggestion": "Quantize a smaller model or fewer calibration samples, "
        "or ask the operator to raise MONOQUANT_JOB_TIMEOUT_S.",
    }
    assert fail_timed_out(settings, store, store.get_job(job.id)) is False


def test_a_job_error_names_the_upload_by_its_file_name_not_its_storage_name(store):
    blob_id = str(uuid.uuid4())
    store.add_blob(
        BlobRow(
            id=blob_id,
            owner="open",
            kind="model",
            filename="my-model.safetensors",
            format="safetensors",
            size=1,
            sha256="0" * 64,
        )
    )
    job_id = store.add_job(JobRow(id=str(uuid.uuid4()), owner="open", params={}, model_blob_id=blob_id)).id
    attempt = store.claim(job_id, "host:1")
    storage_name = uuid.UUID(blob_id).hex
    error = {
        "type": "InputError",
        "message": f"{storage_name} is not a valid safetensors file: tensor 'a' has an invalid shape [True]",
        "suggestion": "Re-export the file (safetensors.torch.save_file); it may be truncated or corrupt.",
    }
    assert store.finish(job_id, "failed", attempt=attempt, error=error)
    stored = store.get_job(job_id).error
    assert (
        stored["message"]
        == "my-model.safetensors is not a valid safetensors file: tensor 'a' has an invalid shape [True]"
    )
    assert storage_name not in str(stored)
    assert store.events(job_id)[-1].data["error"] == stored
