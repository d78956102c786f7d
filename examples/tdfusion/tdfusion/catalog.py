"""The data sets the commands know, and how a command's options find their files.

``DATASETS`` holds each data set's label kinds (number of classes, background included) and
task-view size (section 4.1 of the paper and the released code). The functions turn the
``--dataset`` / ``--root`` / ``--split-dir`` (or ``--a`` / ``--b``) options into pairs of files
or loaded scenes, with a command-line error (``SystemExit`` naming the option) when they cannot.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from . import datasets as ds
from .data import PairFiles, Scene, SceneList, paired_files
from .synthetic import DET_CLASSES, SEG_CLASSES, make_scenes
from .tasks import TASK_KINDS

__all__ = [
    "DATASETS",
    "dataset_classes",
    "dataset_files",
    "load_scenes",
    "matched_names",
    "needed_labels",
]

DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"seg": len(SEG_CLASSES), "det": len(DET_CLASSES), "task_size": (96, 128)},
    "msrs": {"seg": 9, "det": 3, "task_size": (240, 320)},
    "fmb": {"seg": 15, "task_size": (300, 400)},
    "m3fd": {"det": 6, "task_size": (192, 256)},
    "llvip": {"det": 1, "task_size": (256, 320)},
    "folders": {"task_size": (256, 256)},
}
"""Per data set: ``"seg"`` / ``"det"``: number of classes of that label kind; ``"task_size"``."""


def dataset_files(args: argparse.Namespace, split: str, strict: bool = True) -> list[PairFiles]:
    """The pairs of one split of a real data set, in its native layout.

    Args:
        args: the command's options (``dataset``, ``root``, ``split_dir``; ``a``, ``b`` for folders).
        split: ``"train"`` or ``"test"`` (ignored for folders).
        strict: a source without its partner is an error; ``False`` keeps it as a pair whose
            partner path does not exist, so that ``datasets.check_pairs`` names it among the
            other problems.
    """
    if args.dataset == "folders":
        if not (getattr(args, "a", None) and getattr(args, "b", None)):
            raise SystemExit("--dataset folders needs --a DIR and --b DIR")
        return ds.folder_files(args.a, args.b, strict=strict)
    if args.root is None:
        raise SystemExit(f"--root is required for --dataset {args.dataset} (the folder as downloaded)")
    split_dir = Path(args.split_dir) if getattr(args, "split_dir", None) else None
    if args.dataset == "msrs":
        return ds.msrs_files(args.root, split, strict=strict)
    if args.dataset == "fmb":
        return ds.fmb_files(args.root, split, strict=strict)
    if args.dataset == "m3fd":
        return ds.m3fd_files(args.root, split, split_dir, strict=strict)
    if args.dataset == "llvip":
        return ds.llvip_files(args.root, split, strict=strict)
    raise SystemExit(f"unknown data set {args.dataset!r}")


def dataset_classes(name: str, kind: str) -> tuple[str, ...]:
    """The class names of data set ``name`` for labels of ``kind`` (``"seg"`` or ``"det"``)."""
    if name == "msrs":
        return ds.CLASSES["msrs" if kind == "seg" else "msrs_det"]
    if name == "synthetic":
        return SEG_CLASSES if kind == "seg" else DET_CLASSES
    return ds.CLASSES.get(name, ())


def load_scenes(args: argparse.Namespace, split: str, kind: str) -> list[Scene] | SceneList:
    """One split's scenes: generated (``--dataset synthetic``) or read lazily from ``--root``."""
    if args.dataset == "synthetic":
        n = args.synthetic_train if split == "train" else args.synthetic_test
        return make_scenes(
            n, size=DATASETS["synthetic"]["task_size"], seed=args.seed, start=0 if split == "train" else 10_000
        )
    try:
        return SceneList(dataset_files(args, split), dataset_classes(args.dataset, kind))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{args.dataset}: {err}") from err


def needed_labels(dataset: str, task_net: str | None) -> Literal["seg", "det"] | None:
    """The labels a run needs: the task network's kind, or the data set's default task's; none
    for ``folders`` (fusion only)."""
    if dataset == "folders":
        return None
    if task_net is not None:
        return TASK_KINDS[task_net]  # type: ignore[return-value]
    return "seg" if "seg" in DATASETS[dataset] else "det"


def matched_names(a_dir: Path, b_dir: Path) -> list[PairFiles]:
    """The pairs of two folders by stem (``data.paired_files``), as command-line errors."""
    try:
        pairs = paired_files(a_dir, b_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    except ValueError as err:
        raise SystemExit(f"these images have no partner in the other folder: {err}") from None
    if not pairs:
        raise SystemExit(f"no images in {a_dir}")
    return pairs
