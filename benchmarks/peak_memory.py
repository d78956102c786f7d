"""The process's peak resident memory, as the benchmark scripts report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident set size in GiB.

    Read from ``VmHWM`` in ``/proc/self/status`` where there is one (Linux): that high-water mark
    belongs to the process's own address space. ``getrusage``'s ``ru_maxrss`` survives
    ``execve`` on Linux, so in a process started by a large parent (``subprocess`` forks, then
    execs) it reports at least the parent's size at the fork; it is the fallback elsewhere.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
