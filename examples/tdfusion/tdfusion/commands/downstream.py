"""``run.py downstream``: the paper's protocol (section 4.3): a fresh task network trained on each
method's fused training images and scored on its fused test images, one comparison table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from metaloss.fusion.image_io import read_grey

from ..catalog import DATASETS, dataset_classes, load_scenes
from ..cli_values import at_least, positive_float
from ..data import find_image
from ..downstream import TASK_SEED_STRIDE, fresh_task_scores
from ..options import add_device_option
from ..reports import write_downstream_table
from ..tasks import TASK_KINDS, Task, build_task

__all__ = ["add_parser", "downstream"]


def downstream(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's protocol per method: train a fresh task network on the method's fused training
    images, score it on its fused test images (with ``--repeats``, several, their scores averaged);
    one comparison table (downstream.md / .json)."""
    kind = TASK_KINDS[args.task_net]
    names = dataset_classes(args.dataset, kind)
    size = tuple(args.task_size) if args.task_size else DATASETS[args.dataset]["task_size"]
    scenes = {split: load_scenes(args, split, kind) for split in ("train", "test")}

    def fresh_task() -> Task:
        task = build_task(args.task_net, len(names))
        task.model.to(args.device)
        return task

    results: dict[str, Any] = {}
    for spec in args.method:
        try:
            name, train_dir, test_dir = spec.split(":")
        except ValueError:
            raise SystemExit(f"--method {spec!r}: expected NAME:TRAIN_FUSED_DIR:TEST_FUSED_DIR") from None
        images: dict[str, list[np.ndarray]] = {}
        for split, folder in (("train", Path(train_dir)), ("test", Path(test_dir))):
            images[split] = []
            for scene in scenes[split]:
                path = find_image(folder, scene.name)
                if path is None:
                    raise SystemExit(f"method {name}: {folder} has no fused image for {scene.name}")
                images[split].append(read_grey(path))
        networks = f"{args.repeats} fresh {args.task_net} networks" if args.repeats > 1 else args.task_net
        print(f"[downstream] {name}: training {networks} for {args.epochs} epochs", flush=True)
        results[name] = fresh_task_scores(
            fresh_task,
            images["train"],
            list(scenes["train"]),
            images["test"],
            list(scenes["test"]),
            names,
            size,
            repeats=args.repeats,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            progress=not args.quiet,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.json").write_text(json.dumps(results, indent=2))
    each = f"the mean of {args.repeats} fresh networks per method" if args.repeats > 1 else "one per method"
    title = f"Downstream {kind} with {args.task_net} ({args.epochs} epochs, {each}), in %"
    print(write_downstream_table(out / "downstream.md", results, names, kind, title), end="")
    return results


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``downstream`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "downstream", help="the paper's protocol: train a task network on each method's fused images, score it"
    )
    p.add_argument("--dataset", required=True, choices=("msrs", "fmb", "m3fd", "llvip"))
    p.add_argument("--root", required=True, help="the data set's folder as downloaded (labels come from here)")
    p.add_argument("--split-dir", help="folder with train.txt / test.txt name lists (M3FD)")
    p.add_argument("--task-net", choices=sorted(TASK_KINDS), default="segformer")
    p.add_argument(
        "--method",
        action="append",
        required=True,
        metavar="NAME:TRAIN_DIR:TEST_DIR",
        help="a method's fused training and test folders (repeat for each method)",
    )
    p.add_argument("--epochs", type=at_least(1), default=300, help="task-network epochs per method (paper: 300)")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate of the task network")
    p.add_argument(
        "--task-size", type=at_least(8), nargs=2, metavar=("H", "W"), help="task input size (default: per data set)"
    )
    add_device_option(p)
    p.add_argument(
        "--repeats",
        type=at_least(1),
        default=1,
        help="fresh task networks per method, their scores averaged (paper: 1); network k is seeded "
        f"--seed + {TASK_SEED_STRIDE} k, the same for every method, so the comparison stays paired",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=TASK_SEED_STRIDE,
        help="seed of the first fresh task network. Use another than the training run's --seed (train's default is "
        "0): a network that starts from the weights the training run's task network started from favours the "
        "learned loss (docs/learned-loss-study.md, section 16)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=downstream)
    return p
