"""Where a meta step's memory goes: saved tensors by network and dtype, and live memory by stage.

Used by ``meta_iteration.py --trace-memory``. Resident memory follows what is allocated only when
glibc maps every sizeable block on its own and unmaps it when freed, so run it as

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/meta_iteration.py --crop 256 --task-size 256 256 \\
        --malloc default --trace-memory

(slow: every block is faulted in afresh). With ``run.py``'s allocator RSS keeps what was freed,
and the difference between the two peaks is the retained heap's fragmentation.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


def saved_gib_by_dtype(forward: Callable[[], Any]) -> dict[str, float]:
    """GiB of the distinct storages autograd saves for the backward of ``forward()``, by dtype."""
    seen: set[int] = set()
    sizes: collections.Counter[str] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
        return t.detach()  # the tensor itself would tie a saved output to its own node: a leak

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return {dtype: size / 2**30 for dtype, size in sizes.items()}


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class StageTrace:
    """Resident memory at the start and end of each call of the wrapped functions, and its peak
    during the call (sampled every 2 ms in a thread)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []  # (stage, rss at its end, peak, seconds)
        self._peak = _rss_gib()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_gib())

    def _wrap(self, owner: Any, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)

        @functools.wraps(original)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self._peak, started = _rss_gib(), time.perf_counter()
            out = original(*args, **kwargs)
            self.rows.append((label, _rss_gib(), self._peak, time.perf_counter() - started))
            return out

        own = name in vars(owner)  # a module's function, or a method looked up on the class
        setattr(owner, name, traced)
        return (lambda: setattr(owner, name, original)) if own else (lambda: delattr(owner, name))

    @contextlib.contextmanager
    def around(self, model: nn.Module, task_model: nn.Module, generator: Any) -> Iterator[None]:
        """Trace the calls of ``model``, ``task_model``, ``generator.weights`` and every
        ``torch.autograd.grad`` inside the block."""
        restores = [
            self._wrap(model, "forward", "F forward"),
            self._wrap(task_model, "forward", "T forward"),
            self._wrap(generator, "weights", "G forward"),
            self._wrap(torch.autograd, "grad", "backward (autograd.grad)"),
        ]
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            self._stop.set()
            sampler.join()
            for restore in reversed(restores):
                restore()

    def table(self) -> str:
        lines = ["| stage | RSS after, GiB | peak during, GiB | seconds |", "|---|---|---|---|"]
        lines += [f"| {label} | {rss:.2f} | {peak:.2f} | {seconds:.3f} |" for label, rss, peak, seconds in self.rows]
        return "\n".join(lines)


def mmap_threshold_note() -> str:
    """A warning when glibc will keep freed blocks (RSS then does not follow live memory)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return ""
    return "(MALLOC_MMAP_THRESHOLD_ is not set: RSS keeps freed blocks and overstates live memory)"
