"""Keep freed CPU memory for reuse: fewer page faults in the meta step on CPU.

A meta step on CPU allocates and frees multi-megabyte activation buffers many times (the
double backward keeps several versions of every activation alive). glibc's ``malloc`` serves
each block above its mmap threshold with a fresh ``mmap`` and returns it with ``munmap`` when it
is freed, and trims the top of its heap, so every step faults its memory in again: on the 2-core
CPU machine about half of a meta step's time at 2 x 256^2 was spent in the kernel. Serving every
block from the heap and never trimming it lets the next step reuse the same pages: the meta step
there went from 12.8 s to 6.8 s (``benchmarks/meta_iteration.py --malloc retain`` against
``--malloc default``; ``docs/benchmarks.md``), and the eager fusion network's inference on a
480 x 640 pair from 4.36 s to 1.10 s (``benchmarks/fusion_speed.py``). The cost: memory freed
by the process is not given back to the system until it exits, and the peak grew by about 5%.
Different workloads that alternate in one process can fragment the retained heap: two different
meta-step implementations timed in turn at 2 x 256^2 grew past 24 GiB
(``benchmarks/peer_higher.py``).

This changes the whole process's allocator, so the library never does it on its own: call it
once at the start of your program (the TDFusion example's ``run.py`` and the test suite do).

References:
    glibc manual, "Memory Allocation Tunables" and ``mallopt(3)`` (``M_MMAP_THRESHOLD``,
    ``M_TRIM_THRESHOLD``, ``M_TOP_PAD``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems


def retain_freed_memory(top_pad: int = 64 * 1024 * 1024) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the system.

    Every block comes from the heap rather than from ``mmap``, the heap is never trimmed, and it
    grows ``top_pad`` bytes at a time. Affects the whole process, from this call on.

    Args:
        top_pad: extra bytes requested from the system whenever the heap grows.

    Returns:
        ``True`` if the settings were applied; ``False`` where the C library is not glibc
        (macOS, Windows, musl), where nothing is changed.

    Examples:
        >>> applied = retain_freed_memory()  # once, at the start of a training script
        >>> isinstance(applied, bool)
        True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        mallopt(_M_MMAP_MAX, 0),  # larger blocks too: never mmap
        mallopt(_M_TRIM_THRESHOLD, -1),  # -1: never trim (any positive int caps the heap's free top at 2 GiB)
        mallopt(_M_TOP_PAD, min(top_pad, 2**31 - 1)),
    )
    return all(result == 1 for result in done)
