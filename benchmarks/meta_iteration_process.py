"""``meta_iteration.py`` run in a process of its own (so that its peak memory is its own), its
figures read back: shared by the scripts that sweep configurations (``scaling.py``,
``gpu_report.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "meta_iteration.py"
PATTERNS = {
    "plain": r"plain iteration\s+([\d.]+) s",
    "meta": r"meta iteration\s+([\d.]+) s",
    "memory": r"peak (?:RSS|CUDA memory)\s+([\d.]+) GiB",
}


def run_meta_iteration(options: Sequence[str], threads: int) -> dict[str, float]:
    """``python meta_iteration.py *options`` with ``threads`` CPU threads; its plain and meta
    seconds and its peak memory in GiB (``"plain"``, ``"meta"``, ``"memory"``).

    Raises:
        RuntimeError: the run failed, or printed no such figure (its output's end is quoted).
    """
    command = [sys.executable, str(SCRIPT), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    found = {key: re.search(pattern, done.stdout) for key, pattern in PATTERNS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"{' '.join(command)} printed no {missing}:\n{done.stdout[-3000:]}")
    return {key: float(match.group(1)) for key, match in found.items() if match is not None}
