"""Every pointer into ``docs/`` from the README and from the code's own text names a page, and a
heading on it, that exists.

``mkdocs build --strict`` (``.ci/run``) checks the links between the pages themselves, anchors
included (``validation.anchors`` in ``mkdocs.yml``). The README, and the help texts, reports and
docstrings that send a reader to a page (``docs/learned-loss-study.md, section 10``), are not built
by mkdocs; a page moved or a heading renamed would leave them pointing nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import markdown
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_LINK = re.compile(r"\]\((docs/[\w./-]+\.md)(?:#([\w-]+))?\)")
CODE_MENTION = re.compile(r"docs/([\w-]+\.md)")
CODE_FOLDERS = ("metaloss", "examples", "benchmarks")


def heading_ids(page: Path) -> set[str]:
    """The anchors mkdocs gives ``page``'s headings (Python-Markdown's ``toc``, as mkdocs runs it)."""
    converter = markdown.Markdown(extensions=["toc", "fenced_code", "tables", "attr_list"])
    converter.convert(page.read_text(encoding="utf-8"))
    ids: set[str] = set()
    tokens = list(converter.toc_tokens)  # type: ignore[attr-defined]
    while tokens:
        token = tokens.pop()
        ids.add(token["id"])
        tokens.extend(token["children"])
    return ids


def readme_links() -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in README_LINK.finditer((ROOT / "README.md").read_text(encoding="utf-8"))]


def code_mentions() -> list[tuple[str, str]]:
    found = []
    for folder in CODE_FOLDERS:
        for source in sorted((ROOT / folder).rglob("*.py")):
            for page in sorted(set(CODE_MENTION.findall(source.read_text(encoding="utf-8")))):
                found.append((str(source.relative_to(ROOT)), page))
    return found


def test_the_pointers_are_found() -> None:
    """The patterns see the pointers the project is known to hold (else the tests below test nothing)."""
    assert ("docs/learned-loss-study.md", None) in readme_links()
    assert any(anchor for _, anchor in readme_links())
    assert ("examples/tdfusion/tdfusion/reports.py", "learned-loss-study.md") in code_mentions()


def test_heading_ids_follow_mkdocs() -> None:
    ids = heading_ids(DOCS / "learned-loss-study.md")
    assert "11-a-generator-that-sees-shapes-generator-unet-per_pixelunet" in ids  # code spans, '+' dropped
    assert "the-verdict" in ids
    assert not any(i.startswith("python") for i in ids)  # '#' comments in code blocks are not headings


@pytest.mark.parametrize(("target", "anchor"), readme_links(), ids=lambda v: str(v))
def test_readme_links_into_docs_resolve(target: str, anchor: str | None) -> None:
    page = ROOT / target
    assert page.is_file(), f"README.md links to {target}, which does not exist"
    if anchor is not None:
        assert anchor in heading_ids(page), f"README.md links to {target}#{anchor}: no such heading"


@pytest.mark.parametrize(("source", "page"), code_mentions(), ids=lambda v: str(v))
def test_code_mentions_of_docs_resolve(source: str, page: str) -> None:
    assert (DOCS / page).is_file(), f"{source} sends the reader to docs/{page}, which does not exist"
