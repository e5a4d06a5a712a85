"""One run's reused work buffers (core/scratch.py)."""

from __future__ import annotations

import threading

import torch

from mono_quant.core.scratch import reused_scratch, scratch

CPU = torch.device("cpu")


def test_outside_a_run_every_call_allocates():
    a = scratch("t", (4, 4), torch.float32, CPU)
    b = scratch("t", (4, 4), torch.float32, CPU)
    assert a.data_ptr() != b.data_ptr()


def test_inside_a_run_a_tag_gets_its_buffer_back_and_grows_when_too_small():
    with reused_scratch():
        a = scratch("t", (4, 4), torch.float32, CPU)
        assert scratch("t", (2, 8), torch.float32, CPU).data_ptr() == a.data_ptr()
        assert scratch("t", (3,), torch.float32, CPU).shape == (3,)
        other = scratch("u", (4, 4), torch.float32, CPU)  # another tag: another buffer
        assert other.data_ptr() != a.data_ptr()
        assert scratch("t", (4, 4), torch.uint8, CPU).data_ptr() != a.data_ptr()  # and another dtype
        bigger = scratch("t", (8, 8), torch.float32, CPU)
        assert bigger.shape == (8, 8)
        assert scratch("t", (4, 4), torch.float32, CPU).data_ptr() == bigger.data_ptr()
    after = scratch("t", (4, 4), torch.float32, CPU)
    assert after.data_ptr() not in (a.data_ptr(), bigger.data_ptr())


def test_nested_runs_share_the_outer_pool_until_it_exits():
    with reused_scratch():
        a = scratch("t", (16,), torch.float32, CPU)
        with reused_scratch():
            assert scratch("t", (16,), torch.float32, CPU).data_ptr() == a.data_ptr()
        assert scratch("t", (16,), torch.float32, CPU).data_ptr() == a.data_ptr()


def test_each_thread_has_its_own_pool():
    seen = {}

    def worker():
        with reused_scratch():
            seen["other"] = scratch("t", (1024,), torch.float32, CPU).data_ptr()
            seen["mine_visible"] = scratch("t", (1024,), torch.float32, CPU).data_ptr() == seen["other"]

    with reused_scratch():
        mine = scratch("t", (1024,), torch.float32, CPU)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen["mine_visible"]
        assert seen["other"] != mine.data_ptr()
