"""YAML run configurations for ``run.py train``: ``--config FILE.yaml`` and ``key=value`` overrides.

A configuration is a flat YAML mapping whose keys are ``train``'s options with ``_`` for ``-``
(``meta_iterations: 200``). The precedence is: the option's default, then the file, then the
flags on the command line, then ``key=value`` overrides. Every value goes through the option's
own parser (its type, range and choices), so a configuration is checked exactly like the command
line; an unknown key or a bad value is an error naming the key and the file. Every run writes its
resolved configuration as ``config.yaml``, and ``train --config RUN/config.yaml`` repeats it.

PyYAML (``yaml.safe_load``, which builds plain data and never objects) reads and writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

__all__ = ["NOT_CONFIGURABLE", "expand_config", "write_config"]

NOT_CONFIGURABLE = ("config", "overrides", "resume", "out", "help")
"""Options a configuration does not hold: ``--resume`` and ``--out`` name one run's files, so a
configuration can be repeated into a new folder."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_CONFIGURABLE}


def _tokens(action: argparse.Action, key: str, value: Any, where: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line tokens that set ``key`` to ``value``, checked by the option's own parser."""
    flag = next(o for o in action.option_strings if o.startswith("--"))  # the long form, positive first
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction):
        if not isinstance(value, bool):
            parser.error(f"{where}: {key} must be true or false, got {value!r}")
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        return [flag if value else flag.replace("--", "--no-", 1)]
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    expected = action.nargs if isinstance(action.nargs, int) else 1
    if len(values) != expected:
        parser.error(f"{where}: {key} takes {expected} value(s), got {value!r}")
    texts = [str(v) for v in values]
    for text in texts:
        try:
            converted = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, ValueError) as err:
            parser.error(f"{where}: {key}: {err}")
        if action.choices is not None and converted not in action.choices:
            parser.error(f"{where}: {key} must be one of {sorted(action.choices)}, got {text!r}")
    return [flag, *texts]


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Turn ``--config FILE`` and ``key=value`` items of ``argv`` into the flags they stand for.

    The file's settings come first (so flags on the command line win), the overrides last.
    """
    argv = list(argv)
    actions = _actions(parser)
    file_tokens: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("argument --config: expected a YAML file")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as err:
            parser.error(f"argument --config: cannot read {path}: {err.strerror}")
        except yaml.YAMLError as err:
            parser.error(f"argument --config: {path} is not valid YAML: {str(err).splitlines()[0]}")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            parser.error(f"argument --config: {path} must hold a mapping of option: value")
        for key, value in data.items():
            if key not in actions:
                parser.error(f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
            file_tokens += _tokens(actions[key], key, value, str(path), parser)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    rest = [a for a in argv if a not in overrides]
    override_tokens: list[str] = []
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.replace("-", "_")
        if key not in actions:
            parser.error(f"override {item!r}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        parsed: Any = yaml.safe_load(text) if text else None
        nargs = actions[key].nargs
        if isinstance(nargs, int) and nargs > 1 and isinstance(parsed, str):
            parsed = parsed.split(",")  # task_size=64,96
        override_tokens += _tokens(actions[key], key, parsed, f"override {item!r}", parser)
    return [*file_tokens, *rest, *override_tokens]


def write_config(path: Path, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the resolved configuration of a run (every configurable option) as YAML."""
    actions = _actions(parser)
    resolved = {
        key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items() if key in actions
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Resolved configuration of this run: python examples/tdfusion/run.py train --config THIS_FILE\n"
        + yaml.safe_dump(resolved, sort_keys=False)
    )
