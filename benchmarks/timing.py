"""Warm-up-then-median timing, shared by the benchmark scripts that time repeated calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def median_seconds(fn: Callable[[], T], repeats: int, synchronize: Callable[[], None] | None = None) -> tuple[float, T]:
    """Call ``fn`` ``repeats + 1`` times; the first call warms up (caches, compilation).

    Args:
        fn: the work to time.
        repeats: timed calls.
        synchronize: called before and after each call (``torch.cuda.synchronize`` on a GPU).

    Returns:
        The median seconds of the timed calls and the last call's result.
    """
    times, result = [], fn()
    for _ in range(repeats):
        if synchronize is not None:
            synchronize()
        started = time.perf_counter()
        result = fn()
        if synchronize is not None:
            synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result
