"""Shared fixtures: the sample data beside the checkout, and ultralytics kept out of $HOME."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# ultralytics writes a settings file on import: keep it out of the user's home and the repo, and
# remove it when the session ends.
if "YOLO_CONFIG_DIR" not in os.environ:
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="metaloss-yolo-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)
os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from metaloss.allocator import retain_freed_memory  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
retain_freed_memory()  # as run.py does: meta steps on CPU reuse freed memory instead of faulting it in


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not found at {SHARED_DATA}")
    return SHARED_DATA
