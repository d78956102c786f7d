"""YAML run configurations: the shipped files load, a bad key or value names itself and its file,
the precedence is default < file < flag < key=value, and a run's config.yaml repeats the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tdfusion.cli import build_parser, main
from tdfusion.commands.train import config_parser
from tdfusion.run_config import expand_config

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]):
    return build_parser().parse_args(["train", *expand_config(config_parser(), argv), "--out", "unused"])


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_configuration_loads(config: Path) -> None:
    args = _parse(["--config", str(config)])
    for key, value in yaml.safe_load(config.read_text()).items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_shipped_configurations_cover_the_four_data_sets_and_the_paper() -> None:
    assert {p.stem for p in (ROOT / "configs").glob("*.yaml")} >= {"msrs", "fmb", "m3fd", "llvip", "paper"}


@pytest.mark.parametrize(
    "content, words",
    [
        ("epochz: 3\n", ["epochz", "unknown key"]),
        ("epochs: many\n", ["epochs", "many"]),
        ("epochs: 0\n", ["epochs", ">= 1"]),
        ("task_size: [96]\n", ["task_size", "2 value"]),
        ("outer: adamw\n", ["outer", "adamw"]),
        ("flip: 3\n", ["flip", "true or false"]),
        ("- a list\n", ["mapping"]),
        ("resume: last.pt\n", ["resume", "unknown key"]),
    ],
)
def test_a_bad_entry_is_an_error_naming_the_key_and_the_file(
    content: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(config) in err and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_precedence_is_default_then_file_then_flag_then_override(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nlr: 0.01\nalpha: 0.5\nflip: true\n")
    args = _parse(["--config", str(config), "--lr", "0.02", "alpha=0.25", "task_size=64,96"])
    assert (args.epochs, args.lr, args.alpha, args.flip, tuple(args.task_size)) == (7, 0.02, 0.25, True, (64, 96))
    assert args.meta_iterations == 200  # the default, untouched


def test_a_runs_config_yaml_repeats_it(tmp_path: Path) -> None:
    first = tmp_path / "first"
    argv = ["train", "epochs=1", "meta_iterations=1", "model_iterations=1", "synthetic_train=4", "crop=32"]
    main([*argv, "task_size=32,48", "alpha=0.3", "--out", str(first), "--quiet"])
    written = first / "config.yaml"
    assert yaml.safe_load(written.read_text())["alpha"] == 0.3
    again = tmp_path / "again"
    main(["train", "--config", str(written), "--out", str(again), "--quiet"])
    assert (again / "config.yaml").read_text() == written.read_text()
