"""Every public name of the API reference has an example, and every example runs (doctest)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import tempfile
from pathlib import Path

import pytest

MODULES = [
    "metaloss.learnable_loss",
    "metaloss.batch",
    "metaloss.inner_step",
    "metaloss.activation_checkpointing",
    "metaloss.hypergradient",
    "metaloss.meta_step",
    "metaloss.map_gradient",
    "metaloss.outer",
    "metaloss.trainer",
    "metaloss.distributed",
    "metaloss.checkpoint",
    "metaloss.callbacks",
    "metaloss.grouped_conv",
    "metaloss.allocator",
    "metaloss.fusion.losses",
    "metaloss.fusion.networks",
    "metaloss.fusion.bands",
    "metaloss.fusion.image_io",
    "metaloss.fusion.metrics",
    "metaloss.fusion.export",
]
"""The modules the API reference renders (docs/api/*.md)."""


def test_the_listed_modules_are_those_the_api_reference_renders() -> None:
    from pathlib import Path

    pages = (Path(__file__).resolve().parents[1] / "docs" / "api").glob("*.md")
    rendered = {line[4:].strip() for page in pages for line in page.read_text().splitlines() if line.startswith(":::")}
    assert rendered == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_and_class_has_an_example(name: str) -> None:
    module = importlib.import_module(name)
    missing = [
        public
        for public in module.__all__
        if (inspect.isclass(obj := getattr(module, public)) or inspect.isfunction(obj))
        and ">>>" not in (inspect.getdoc(obj) or "")
    ]
    assert not missing, f"{name}: no example in the docstring of {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples write into tempfile.mkdtemp() folders: make those pytest's, which it prunes.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True
    )
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"
