"""``run.py check-data``: validate a data set folder before a long run, and the same checks on
``train``'s split before it starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

from .. import datasets as ds
from ..catalog import dataset_classes, dataset_files, needed_labels
from ..tasks import TASK_KINDS

__all__ = ["add_parser", "check_data", "check_training_data"]


def check_training_data(args: argparse.Namespace, kind: Literal["seg", "det"]) -> None:
    """``check-data``'s checks on the training split, before ``train`` starts; exits 1 naming
    every offending file (a missing label, an id outside the classes, a bad image)."""
    try:
        files = dataset_files(args, "train", strict=False)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{args.dataset}: {err}") from None
    classes = dataset_classes(args.dataset, "seg"), dataset_classes(args.dataset, "det")
    report = ds.check_pairs(files, *classes, progress=not args.quiet, need=kind)
    if report.problems:
        shown = "\n  ".join(report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        raise SystemExit(f"{args.dataset} training data: {len(report.problems)} problem(s):\n  {shown}{more}")


def check_data(args: argparse.Namespace) -> None:
    """Per split: pair count, image sizes, class histogram; exit 1 naming every offending file."""
    splits = ["all"] if args.dataset == "folders" else ["train", "test"]
    seg_classes = dataset_classes(args.dataset, "seg")
    box_classes = dataset_classes(args.dataset, "det")
    need = needed_labels(args.dataset, args.task_net)
    problems = []
    for split in splits:
        try:
            files = dataset_files(args, split, strict=False)  # a lonely source is listed with the rest
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"[{split}] {err}")
            continue
        if args.write_splits and args.dataset in ("m3fd", "llvip"):
            ds.write_split(
                Path(args.write_splits) / f"{split}.txt", [f.name for f in files], f"{args.dataset} {split} split"
            )
        report = ds.check_pairs(files, seg_classes, box_classes, progress=not args.quiet, need=need)
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in report.sizes.most_common())
        print(f"[{split}] {report.pairs} pairs; sizes {sizes or '-'}")
        for what, counts, names in (("label pixels", report.pixels, seg_classes), ("boxes", report.boxes, box_classes)):
            if counts:
                hist = ", ".join(f"{names[i] if i < len(names) else i}: {n}" for i, n in sorted(counts.items()))
                print(f"[{split}] {what} per class: {hist}")
        problems += [f"[{split}] {p}" for p in report.problems]
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        raise SystemExit(1)
    print("ok")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``check-data`` on the subparsers ``sub``."""
    p = sub.add_parser("check-data", help="validate a data set folder before a long run; exit 1 naming each bad file")
    p.add_argument("--dataset", required=True, choices=("msrs", "fmb", "m3fd", "llvip", "folders"))
    p.add_argument("--root", help="the data set's folder as downloaded")
    p.add_argument("--a", help="--dataset folders: first source folder")
    p.add_argument("--b", help="--dataset folders: second source folder")
    p.add_argument("--split-dir", help="read train.txt / test.txt from here (M3FD)")
    p.add_argument("--write-splits", help="write the generated splits (M3FD, LLVIP) as name lists here")
    p.add_argument(
        "--task-net",
        choices=sorted(TASK_KINDS),
        help="check the labels this task network needs (segformer/unet: label maps; yolov8: boxes); "
        "default: the data set's default task (segmentation where it has it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", help="unused; accepted for symmetry with the other commands")
    p.set_defaults(func=check_data)
    return p
