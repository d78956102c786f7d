"""TDFusion on metaloss: train, fuse, evaluate; with no arguments, the embedded demo.

python examples/tdfusion/run.py                 # demo: procedural scenes, a few CPU minutes
python examples/tdfusion/run.py train --help
python examples/tdfusion/run.py fuse --weights CKPT --a IR_DIR --b VIS_DIR --out DIR
python examples/tdfusion/run.py evaluate --fused DIR [DIR ...] --a IR_DIR --b VIS_DIR --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metaloss.distributed import leave_process_group

from .cli_values import check_paths
from .commands import COMMANDS
from .commands.train import config_parser
from .run_config import expand_config

__all__ = ["build_parser", "main"]


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help, unless its help already names its default
    or it has none (``None``: the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``commands.COMMANDS``), each showing its defaults in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    for command in COMMANDS:
        command.add_parser(sub).formatter_class = _DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``; no command means ``demo``), check every value and
    path before any work, run the command and print the folder it wrote, if any."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]  # no subcommand: the demo, with any options given
    if argv[0] == "train" and not {"-h", "--help"} & set(argv):
        argv = ["train", *expand_config(config_parser(), argv[1:])]
    args = parser.parse_args(argv)
    check_paths(parser, args)  # before any work or any file written
    if getattr(args, "quiet", False):
        os.environ["YOLO_VERBOSE"] = "False"  # ultralytics reads it when first imported (lazily, later)
    result = args.func(args)
    if isinstance(result, Path):
        print(result.resolve())
    del result  # a trainer's DDP wrappers go before the process group they talk through
    leave_process_group()
