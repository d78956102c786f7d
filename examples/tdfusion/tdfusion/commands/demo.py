"""``run.py demo`` (the default command): TDFusion against the fixed ``w = 1/2`` and infrared-only
losses on the embedded procedural scenes, each scored the paper's way; a report folder with the
verdict."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaloss.fusion.image_io import write_grey
from metaloss.fusion.metrics import evaluate_fusion

from ..catalog import DATASETS, load_scenes
from ..cli_values import at_least
from ..data import FusionDataset, Scene, SceneList, collate
from ..downstream import TASK_SEED_STRIDE
from ..networks import ABLATIONS
from ..options import add_training_options
from ..reports import write_demo_summary, write_weight_figure
from ..study import OracleProbe, downstream_miou, fuse_scenes, weights_at
from ..tasks import TASK_KINDS
from .train import train

__all__ = ["ARMS", "ArmSpec", "add_parser", "demo", "run_arms"]

ArmSpec = tuple[str, tuple[float, float] | None]
"""An arm as its ``--ablation`` and its ``--fixed-weights`` (``None``: the ablation's own)."""

ARMS: dict[str, ArmSpec] = {
    "tdfusion": ("none", None),
    "fixed_half": ("I", None),
    "fixed_infrared": ("I", (1.0, 0.0)),
}
"""The arms ``run_arms`` can train, each as its ``--ablation`` and ``--fixed-weights``: the learned
loss, the fixed ``w = 1/2`` loss (ablation I, the paper's baseline) and the fixed infrared-only
loss (the fixed loss these scenes favour most: docs/learned-loss-study.md, section 12)."""


def run_arms(
    args: argparse.Namespace, out: Path, probe: bool = False, arms: Mapping[str, ArmSpec] | None = None
) -> dict[str, Any]:
    """Train the chosen arms on the procedural scenes and score each the paper's way (section 4.3).

    Per arm: train with Algorithm 1 (``--ablation I`` and its fixed weights for a fixed arm), fuse
    the training and test scenes, train a fresh task network on the fused training scenes and
    score it on the fused test scenes (``--task-repeats``: several, averaged); the six fusion
    metrics on the test scenes; for the learned arm, where its loss puts its weight
    (``study.weights_at``) and, with ``probe``, the per-epoch ``study.OracleProbe`` rows.
    ``arms``: the arms to run, by name (``None``: ``ARMS``, as the demo runs; a subset of it, or a
    fixed arm of other weights, for the benchmarks).
    """
    arms = ARMS if arms is None else arms
    train_scenes = load_scenes(args, "train", "seg")
    test_scenes = load_scenes(args, "test", "seg")
    results: dict[str, Any] = {}
    for method, (ablation, fixed_weights) in arms.items():
        if not args.quiet:
            what = ABLATIONS[ablation]
            if fixed_weights:
                what = f"fixed w_infrared = {fixed_weights[0]:g}, w_visible = {fixed_weights[1]:g}"
            print(f"[demo] training {method}: {what}", flush=True)
        overrides = {"ablation": ablation, "fixed_weights": fixed_weights, "out": str(out / method), "resume": None}
        run_args = argparse.Namespace(**{**vars(args), **overrides})
        callbacks: list[Any] = []
        if probe and ablation == "none":
            callbacks.append(OracleProbe(_probe_pairs(run_args, train_scenes), test_scenes, out / method / "probe.csv"))
        t0 = time.time()
        trainer = train(run_args, callbacks)
        seconds = time.time() - t0
        fused_train, fused_test = fuse_scenes(trainer.model, train_scenes), fuse_scenes(trainer.model, test_scenes)
        for s, f in zip(test_scenes, fused_test):
            write_grey(out / method / "fused" / f"{s.name}.png", f)
        t0 = time.time()
        scores = downstream_miou(
            fused_train,
            train_scenes,
            fused_test,
            test_scenes,
            epochs=args.task_epochs,
            seed=scoring_seed(args),
            task_net=args.task_net,
            repeats=args.task_repeats,
            progress=not args.quiet,
        )
        metrics = evaluate_fusion(
            torch.from_numpy(np.stack(fused_test)),
            torch.from_numpy(np.stack([s.a for s in test_scenes])),
            torch.from_numpy(np.stack([s.b for s in test_scenes])),
        )
        results[method] = {
            "train_seconds": round(seconds, 1),
            "downstream_seconds": round(time.time() - t0, 1),
            "downstream": _miou_and_iou(scores),
            "fusion_metrics": {k: float(v.mean()) for k, v in metrics.items()},
        }
        if ablation == "none":
            results[method]["weights_at"] = weights_at(trainer.loss, test_scenes)
            if callbacks:
                results[method]["probe"] = callbacks[0].rows
            shown = [test_scenes[i] for i in range(min(4, len(test_scenes)))]
            write_weight_figure(out / "weights.png", trainer.loss, shown, fused_test[: len(shown)])
    return results


def scoring_seed(args: argparse.Namespace) -> int:
    """The seed of an arm's first fresh scoring network: ``--seed + --task-seed-offset``. Not
    ``--seed`` itself by default: the training run built its task network, the one a learned loss is
    meta-trained against, from ``--seed``, and a scoring network should share nothing with the run
    it judges (docs/learned-loss-study.md, section 16)."""
    return args.seed + args.task_seed_offset


def _miou_and_iou(scores: Mapping[str, Any]) -> dict[str, Any]:
    """A downstream score as ``metrics.json`` keeps it: mIoU and per-class IoU, and each fresh task
    network's (with its seed) when there were several."""
    kept: dict[str, Any] = {"mIoU": scores["mIoU"], "per_class": {k: v["IoU"] for k, v in scores["per_class"].items()}}
    if "task_networks" in scores:
        kept["task_networks"] = [{"seed": run["seed"], **_miou_and_iou(run)} for run in scores["task_networks"]]
    return kept


def _probe_pairs(args: argparse.Namespace, scenes: list[Scene] | SceneList) -> list[tuple[Any, Any]]:
    """Four fixed (meta-train, meta-test) pairs of training samples for ``study.OracleProbe``
    (the scenes cycle when there are fewer than eight batches of them)."""
    g = torch.Generator().manual_seed(12345)
    dataset = FusionDataset(scenes, "seg", crop=args.crop, task_size=DATASETS["synthetic"]["task_size"])
    state = torch.get_rng_state()
    torch.manual_seed(12345)  # the crops' windows; the global stream is restored below
    order = torch.randperm(len(dataset), generator=g).tolist()
    size = args.batch_size
    batches = [collate([dataset[order[(j + t) % len(order)]] for t in range(size)]) for j in range(0, 8 * size, size)]
    torch.set_rng_state(state)
    return list(zip(batches[0::2], batches[1::2]))


def demo(args: argparse.Namespace) -> Path:
    """Train TDFusion and the two fixed-weight baselines on procedural scenes; score each; report."""
    if TASK_KINDS[args.task_net] != "seg":
        raise SystemExit(f"--task-net {args.task_net}: the demo scores segmentation (segformer or unet)")
    if args.dataset != "synthetic":
        raise SystemExit("the demo runs on --dataset synthetic; use train / fuse / downstream for real data sets")
    out = Path(args.out)
    started = time.time()
    results = run_arms(args, out)
    results["convention"] = "mean"
    results["task_net"] = args.task_net
    results["task_seed"] = scoring_seed(args)
    results["task_repeats"] = args.task_repeats
    results["virtual_step"] = args.virtual_step
    results["generator"] = args.generator
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_demo_summary(out, results, time.time() - started)
    return out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the subparsers ``sub``."""
    p = sub.add_parser("demo", help="the embedded demo (the default): train, fuse, evaluate, report")
    add_training_options(p, demo_defaults=True)
    p.add_argument("--task-epochs", type=at_least(1), default=30, help="epochs of each arm's fresh task network")
    p.add_argument(
        "--task-repeats",
        type=at_least(1),
        default=1,
        help="fresh task networks per arm, their scores averaged (paper: 1); network k (from 0) is seeded --seed + "
        f"--task-seed-offset + {TASK_SEED_STRIDE} k, the same in every arm. One network's draw moves a paired "
        "difference by about 5 mIoU points (docs/learned-loss-study.md, section 16)",
    )
    p.add_argument(
        "--task-seed-offset",
        type=int,
        default=TASK_SEED_STRIDE,
        help="each arm's first fresh task network is seeded --seed plus this, so that it does not start from the "
        "weights of the training run's task network, which the learned loss was meta-trained against; 0 scores as "
        "the demo did before docs/learned-loss-study.md, section 16",
    )
    p.add_argument("--out", default="tdfusion_out/demo", help="report folder")
    p.set_defaults(func=demo)
    return p
