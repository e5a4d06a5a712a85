"""Storage.sweep_temp: partial writes of dead processes go, young ones stay."""

from __future__ import annotations

import os
import time

from app.storage import Storage


def test_sweep_removes_only_old_partial_writes(tmp_path):
    storage = Storage(tmp_path)
    storage.ensure()
    old = storage.temp_path()
    old.write_bytes(b"half a model")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    young = storage.temp_path()
    young.write_bytes(b"being written")
    assert storage.sweep_temp(older_than_s=600) == 1
    assert not old.exists()
    assert young.exists()
