"""Progress reporting: tqdm bars for people, a callback for services. Both optional."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["ProgressCallback", "Progress"]

ProgressCallback = Callable[[str, float], None]
T = TypeVar("T")


class Progress:
    """Reports ``(stage, fraction)`` to a callback and, if asked, draws a tqdm bar per stage.

    Example:
        >>> seen = []
        >>> p = Progress(callback=lambda stage, f: seen.append((stage, f)))
        >>> list(p.track([1, 2], "quantize", total=2))
        [1, 2]
        >>> seen[-1]
        ('quantize', 1.0)
    """

    def __init__(self, show: bool = False, callback: ProgressCallback | None = None) -> None:
        self.show = show
        self.callback = callback

    def report(self, stage: str, fraction: float) -> None:
        if self.callback is not None:
            self.callback(stage, min(max(fraction, 0.0), 1.0))

    def track(self, items: Iterable[T], stage: str, total: int | None = None) -> Iterator[T]:
        """Yield ``items``, reporting the fraction done after each."""
        bar = None
        if self.show:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=stage, unit="layer" if stage == "quantize" else "batch")
        self.report(stage, 0.0)
        done = 0
        try:
            for item in items:
                yield item
                done += 1
                if bar is not None:
                    bar.update(1)
                if total:
                    self.report(stage, done / total)
        finally:
            if bar is not None:
                bar.close()
        self.report(stage, 1.0)
