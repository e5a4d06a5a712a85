"""Work buffers that one quantization run reuses from layer to layer.

Quantizing a layer on the CPU works through block-sized temporaries (the fp32 block being
rounded, its codes, the packing's words, the kernel layout's halves). Allocated per layer, each
is fresh memory in a fresh process: large allocations are mmap-ed and every page faults in on
first touch, which is most of a cold int4 run's time (16 x 4096 x 4096 on Zen 4: ~160k minor
faults against ~36k for the result itself). Inside :func:`reused_scratch` (entered by
``quantize_layers``) :func:`scratch` hands out the same buffers again, so they fault in once
per run; outside it, it simply allocates. The pool is per thread (the service quantizes
several models at once) and is dropped when the outermost block exits.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

__all__ = ["reused_scratch", "scratch"]

_LOCAL = threading.local()


@contextlib.contextmanager
def reused_scratch() -> Iterator[None]:
    """Reuse :func:`scratch` buffers until the outermost such block exits."""
    outermost = getattr(_LOCAL, "pool", None) is None
    if outermost:
        _LOCAL.pool = {}
    try:
        yield
    finally:
        if outermost:
            _LOCAL.pool = None


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor for work named ``tag``: the pool's buffer for that tag
    (grown when too small) inside :func:`reused_scratch`, a new one outside. Two live buffers
    need two tags: the same tag returns the same memory."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    key = (tag, dtype, torch.device(device))
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)
