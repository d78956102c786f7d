"""Every Python code block of the README and the docs runs (mktestdocs), and so do the tutorials."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from mktestdocs import check_md_file

ROOT = Path(__file__).resolve().parents[1]
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if "```python" in p.read_text()]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the blocks are written to run from the repository root
    monkeypatch.setattr(sys, "path", list(sys.path))  # a block may extend the import path
    check_md_file(page, memory=True)


def test_pages_with_code_are_found() -> None:
    assert {p.name for p in PAGES} >= {"README.md", "tdfusion.md"}


def test_tutorial_1_trains_all_three_networks_in_your_own_loop() -> None:
    sys.path.insert(0, str(ROOT / "examples" / "tutorials"))
    try:
        from meta_step_in_your_loop import train
    finally:
        sys.path.pop(0)
    report = train(steps=5, seed=0)
    assert set(report) == {"weight_on_a_start", "weight_on_a_end", "iou_start", "iou_end"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in report.values())
    assert report["weight_on_a_end"] != report["weight_on_a_start"], "the meta step did not move G"


def test_tutorial_4_learns_a_loss_from_a_fixed_metric_without_a_task_network() -> None:
    sys.path.insert(0, str(ROOT / "examples" / "tutorials"))
    try:
        from learned_loss_beyond_fusion import train
    finally:
        sys.path.pop(0)
    learned, fixed = train(steps=5, seed=0, learn=True), train(steps=5, seed=0, learn=False)
    assert all(math.isfinite(v) for v in [*learned.values(), *fixed.values()])
    assert fixed["weight_on_a_left"] == fixed["weight_on_a_right"] == 0.5
    assert learned["weight_on_a_left"] != 0.5, "the meta step did not move G"
