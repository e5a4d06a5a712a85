"""Workers share the machine's cores: each worker's torch gets its part, never all of them."""

from __future__ import annotations

import os

from app.config import Settings


def test_embedded_workers_split_the_cores(tmp_path):
    cores = os.cpu_count() or 1
    assert Settings(data_dir=tmp_path, workers=1).torch_threads == cores
    assert Settings(data_dir=tmp_path, workers=2).torch_threads == max(1, cores // 2)
    assert Settings(data_dir=tmp_path, workers=64).torch_threads == max(1, cores // 64)


def test_explicit_threads_and_celery(tmp_path):
    assert Settings(data_dir=tmp_path, workers=4, worker_threads=3).torch_threads == 3
    celery = Settings(data_dir=tmp_path, workers=4, queue="celery", broker_url="redis://127.0.0.1:6379/0")
    assert celery.torch_threads == (os.cpu_count() or 1)
