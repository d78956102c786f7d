"""How far the demo's loss generator G can move in the demo's budget when told the answer.

The learned maps of the demo (``run.py demo``) put infrared on the hot targets but not visible
light on the markings (``docs/learned-loss-study.md``, sections 9 and 10). This script separates two
possible limits: what G's architecture and the demo's outer optimiser can reach at all, and what
the meta-gradient asks of them. It trains the demo's G (same architecture, initialisation seed,
training scenes and Adam learning rate) by *direct supervision*: a per-pixel cross-entropy
between G's weights and a fixed target map from the ground truth (``study.FIXED_MAPS``), on
batches of as many whole training scenes as one of the demo's outer steps sees (its meta-train
batches: ``--meta-accumulation`` pairs of ``--batch-size`` scenes). After as many steps as the
demo's meta phase takes (``(epochs - warmup_epochs) x meta_iterations``) and after longer runs, it
prints where G puts its weight on the held-out test scenes (``study.weights_at``): the same
numbers as the demo's ``metrics.json``.

Direct supervision is not an upper bound on what the meta-gradient could reach (Adam normalises
each parameter's step, so a different signal of the same sign pattern moves G by as much), but it
says whether the bar is within the budget's reach when every step points at the answer.

    python benchmarks/generator_capacity.py --seeds 3
    python benchmarks/generator_capacity.py --seeds 3 --targets oracle_hiding -- --outer-lr 1e-3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tdfusion.catalog import load_scenes  # noqa: E402
from tdfusion.cli import build_parser  # noqa: E402
from tdfusion.data import to_unit  # noqa: E402
from tdfusion.networks import build_loss  # noqa: E402
from tdfusion.study import FIXED_MAPS, weights_at  # noqa: E402
from tdfusion.synthetic import SEG_CLASSES  # noqa: E402
from tdfusion.tasks import median_frequency_weights  # noqa: E402

COLUMNS = (
    "target_infrared",
    "marking_visible_day",
    "marking_visible_night",
    "marking_brighter",
    "marking_surround_visible",
    "cold_lookalike_visible_day",
    "hot_seam_infrared_day",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (scenes and G's initialisation, as the demo)")
    p.add_argument(
        "--targets",
        nargs="+",
        default=["oracle", "oracle_hiding"],
        choices=sorted(FIXED_MAPS),
        help="the maps G is supervised toward (benchmarks/oracle_weights.py scores each downstream)",
    )
    p.add_argument(
        "--multiples",
        type=float,
        nargs="+",
        default=[0.25, 1, 4, 16],
        help="report after these multiples of the demo's number of outer steps",
    )
    p.add_argument(
        "--balanced",
        action="store_true",
        help="weigh each pixel's cross-entropy by its class's median-frequency weight over the training scenes "
        "(tasks.median_frequency_weights, as the demo's --balanced-task-loss weighs the task loss)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("demo_options", nargs=argparse.REMAINDER, help="after --: options of run.py demo")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    extra = [a for a in args.demo_options if a != "--"]
    demo = build_parser().parse_args(["demo", *extra])
    if demo.outer != "adam" or demo.generator == "global" or demo.ablation != "none":
        p.error(
            f"after --: supervision trains a per-pixel G with Adam; got --outer {demo.outer}, "
            f"--generator {demo.generator}, --ablation {demo.ablation}"
        )
    budget = (demo.epochs - demo.warmup_epochs) * demo.meta_iterations
    batch = demo.meta_accumulation * demo.batch_size
    checkpoints = sorted({max(1, round(m * budget)) for m in args.multiples})
    print(
        f"demo options: {' '.join(extra) or '(defaults)'}; the demo's meta phase: {budget} outer steps of "
        f"{demo.outer} at {demo.outer_lr:g}, {batch} scenes each"
    )
    print("\n| target | seed | steps | " + " | ".join(COLUMNS) + " | cross-entropy | seconds |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for target in args.targets:
        for seed in range(args.seeds):
            results[(target, seed)] = supervise(demo, target, seed, batch, checkpoints, args.balanced)
    kind = "class-balanced" if args.balanced else "plain"
    print(f"\nMean over seeds ({kind} cross-entropy; the bar: 0.7 on target_infrared and on marking_visible):\n")
    print("| target | steps | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for target in args.targets:
        for i, step in enumerate(checkpoints):
            rows = [results[(target, seed)][i] for seed in range(args.seeds)]
            cells = [f"{np.mean([r[c] for r in rows]):.2f} +- {np.std([r[c] for r in rows]):.2f}" for c in COLUMNS]
            print(f"| {target} | {step} | " + " | ".join(cells) + " |")


def supervise(
    demo: argparse.Namespace, target: str, seed: int, batch: int, checkpoints: list[int], balanced: bool = False
) -> list[dict[str, float]]:
    """Train the demo's G toward ``target`` from seed ``seed``; one ``weights_at`` row per checkpoint.
    ``balanced``: each pixel weighed by its class's median-frequency weight over the training scenes."""
    demo = argparse.Namespace(**{**vars(demo), "seed": seed})
    train, test = load_scenes(demo, "train", "seg"), load_scenes(demo, "test", "seg")
    torch.manual_seed(seed)
    loss = build_loss(demo)
    generator = loss.generator
    optimizer = torch.optim.Adam(generator.parameters(), lr=demo.outer_lr)
    a = torch.cat([to_unit(s.a) for s in train])
    b = torch.cat([to_unit(s.b) for s in train])
    w_infrared = torch.from_numpy(np.stack([FIXED_MAPS[target](s)[0] for s in train]))[:, None]
    masks = [s.label_mask() for s in train]
    pixel_weights = median_frequency_weights(masks, len(SEG_CLASSES))[torch.from_numpy(np.stack(masks)).long()[:, None]]
    order = torch.Generator().manual_seed(seed)
    rows, started = [], time.time()
    for step in range(1, checkpoints[-1] + 1):
        pick = torch.randint(len(train), (batch,), generator=order)
        log_w = torch.log(loss.weights([a[pick], b[pick]]).clamp_min(1e-12))
        t = w_infrared[pick]
        per_pixel = -(t * log_w[:, :1] + (1 - t) * log_w[:, 1:])
        cross_entropy = (per_pixel * pixel_weights[pick]).mean() if balanced else per_pixel.mean()
        optimizer.zero_grad()
        cross_entropy.backward()
        optimizer.step()
        if step in checkpoints:
            row = weights_at(loss, test)
            rows.append(row)
            cells = " | ".join(f"{row[c]:.2f}" for c in COLUMNS)
            print(
                f"| {target} | {seed} | {step} | {cells} | {cross_entropy.item():.3f} | {time.time() - started:.0f} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
