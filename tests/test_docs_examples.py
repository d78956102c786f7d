"""Every Python code block of the README and the docs runs (mktestdocs); the tutorials are in test_tutorials."""

from __future__ import annotations

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
