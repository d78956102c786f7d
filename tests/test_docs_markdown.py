"""The documentation's Markdown renders as written under mkdocs (Python-Markdown).

Python-Markdown nests a list only under four spaces of indentation, where GitHub's renderer takes
two: a sub-list indented by two spaces shows as a flat list on the built site, with no error from
``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))
SHALLOW_ITEM = re.compile(r"^ {1,3}(?:[-*+]|\d+\.) ")


def shallow_sub_items(text: str) -> list[int]:
    """The line numbers of list items indented by one to three spaces, outside fenced code."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and SHALLOW_ITEM.match(line):
            found.append(number)
    return found


def test_a_shallow_sub_item_is_found() -> None:
    assert shallow_sub_items("- a\n  - b\n    - c\n```\n  - code\n```\n") == [2]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sub_lists_are_indented_by_four_spaces(page: Path) -> None:
    lines = shallow_sub_items(page.read_text(encoding="utf-8"))
    assert not lines, f"{page.relative_to(ROOT)}: list items indented by 1-3 spaces (lines {lines}) render flat"
