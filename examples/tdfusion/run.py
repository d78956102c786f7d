#!/usr/bin/env python
"""TDFusion on metaloss: the command line (``python examples/tdfusion/run.py --help``).

A thin entry point: the commands live in the ``tdfusion`` package beside this file
(``tdfusion/commands/``, one module each).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# ultralytics' settings and matplotlib's backend, before either is imported
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tdfusion package beside this file

from tdfusion.cli import main  # noqa: E402

from metaloss.allocator import retain_freed_memory  # noqa: E402

if __name__ == "__main__":
    retain_freed_memory()  # CPU: freed activation memory is reused, not faulted in again each step
    main()
