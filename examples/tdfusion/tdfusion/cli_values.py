"""Command-line value checks: a bad value is an argparse error (exit 2) naming the flag and the
allowed range, raised while parsing, before any work is done or any file is written."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch

from metaloss.learnable_loss import check_source_weights

__all__ = ["at_least", "check_paths", "device", "positive_float", "non_negative_float"]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float(text: str, *, strict: bool) -> float:
    bound = "> 0" if strict else ">= 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
    if not value == value or value in (float("inf"), float("-inf")) or value < 0 or (strict and value == 0):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _float(text, strict=True)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _float(text, strict=False)


def device(text: str) -> str:
    """An argparse type: ``cpu``, or ``cuda`` / ``cuda:N`` when that GPU exists here."""
    if text == "cpu":
        return text
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available on this machine; use cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _writable_folder_problem(path: Path) -> str | None:
    if path.exists():
        if not path.is_dir():
            return "exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created: {parent} is not writable"


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need several values or the file system: ``--out`` must be a writable folder (or
    creatable), ``--warmup-epochs`` at most ``--epochs``, ``--bf16`` only with the torch backend,
    ``--fixed-weights`` only with ``--ablation I``, ``--prior-weights`` and ``--loss-from`` only with a
    learned loss, the weights summing to 1, ``--loss-from``'s file fitting the loss generator.
    Calls ``parser.error`` (exit 2)."""
    out = getattr(args, "out", None)
    if out and args.func.__name__ == "export":  # --out is a file
        if Path(out).is_dir():
            parser.error(f"argument --out: {out} is a folder; name the file to write")
        problem = _writable_folder_problem(Path(out).parent)
        if problem:
            parser.error(f"argument --out: its folder {Path(out).parent} {problem}")
    elif out and args.func.__name__ != "check_data":
        problem = _writable_folder_problem(Path(out))
        if problem:
            parser.error(f"argument --out: {out} {problem}")
    if getattr(args, "bf16", False) and getattr(args, "backend", "torch") == "onnxruntime":
        parser.error("argument --bf16: applies to --backend torch; onnxruntime runs the exported float32 network")
    if getattr(args, "fixed_weights", None) is not None and args.ablation != "I":
        parser.error(f"argument --fixed-weights: applies to --ablation I, not --ablation {args.ablation}")
    if getattr(args, "prior_weights", None) is not None and args.ablation in ("I", "V"):
        parser.error(f"argument --prior-weights: a fixed loss (--ablation {args.ablation}) has no generator to start")
    for dest, positive in (("fixed_weights", False), ("prior_weights", True)):
        pair = getattr(args, dest, None)
        if pair is not None:
            try:
                check_source_weights(pair, 2, positive=positive, name="the two weights")
            except ValueError as error:
                parser.error(f"argument --{dest.replace('_', '-')}: {error}")
    if getattr(args, "loss_from", None) is not None:
        _check_loss_from(parser, args)
    warmup, epochs = getattr(args, "warmup_epochs", None), getattr(args, "epochs", None)
    if warmup is not None and epochs is not None and warmup > epochs:
        parser.error(f"argument --warmup-epochs: must be <= --epochs ({epochs}), got {warmup}")
    frozen = getattr(args, "frozen_loss_epochs", None)
    if frozen is not None and warmup is not None and epochs is not None and warmup + frozen > epochs:
        parser.error(
            f"argument --frozen-loss-epochs: --warmup-epochs ({warmup}) + --frozen-loss-epochs ({frozen}) "
            f"must be <= --epochs ({epochs})"
        )


def _check_loss_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--loss-from``: a learned loss, and a file whose state fits the chosen generator (loaded once
    here, before any work; the generator is small)."""
    from tdfusion.networks import build_loss  # the networks' module imports far more than this one

    if args.ablation in ("I", "V"):
        parser.error(f"argument --loss-from: a fixed loss (--ablation {args.ablation}) has no generator to load")
    try:
        build_loss(args)
    except (OSError, ValueError) as error:
        parser.error(f"argument --loss-from: {error}")
