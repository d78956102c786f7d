"""How much per-pixel source choice can matter on the procedural scenes: fixed weight maps.

For each fixed weight map (the oracle from each scene's ground truth: w_infrared = 1 on hot
targets, w_visible = 1 on markings, 1/2 elsewhere; w = 1/2; infrared only; visible only) and each
scene design (with and without the single-camera look-alikes), train ReFusion under the TDFusion
loss with that map, fuse the training and test scenes, train a *fresh* SegFormer-b0 on the fused
training scenes and score it on the fused test scenes (the paper's downstream protocol, section
4.3). Prints mIoU and per-class IoU per seed, then the mean over seeds and the paired difference
each map - the ``--baseline`` map (``half`` unless set) with its 95% interval, in mIoU and
per-class IoU.

    python benchmarks/oracle_weights.py --seeds 3

What the markings' half of the oracle is worth: ``oracle_hiding`` against the same map with
infrared, ``1/2`` or the brighter source on the marking pixels (``--alpha 0.01``, the demo's):

    python benchmarks/oracle_weights.py --seeds 5 --designs decoys --alpha 0.01 --baseline oracle_hiding \\
        --maps oracle_hiding oracle_hiding_markings_infrared oracle_hiding_markings_half oracle_hiding_markings_brighter

What it costs to show the cold look-alikes by day as the markings are shown (the map of a
generator that weighs each pixel by which camera shows it bright, and meets the markings' bar):

    python benchmarks/oracle_weights.py --seeds 5 --designs decoys --alpha 0.01 --baseline oracle_hiding \\
        --maps oracle_hiding oracle_hiding_cold_lookalikes_visible
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
from tdfusion.study import FIXED_MAPS, downstream_miou, fuse_scenes, paired_interval, train_fusion_fixed  # noqa: E402
from tdfusion.synthetic import SEG_CLASSES, make_scenes  # noqa: E402

from metaloss.allocator import retain_freed_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (scenes, F and the task network)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed: seeds K..K+N-1")
    default_maps = [m for m in FIXED_MAPS if not m.startswith("oracle_hiding_")]  # its variants on request
    p.add_argument("--maps", nargs="+", default=default_maps, choices=list(FIXED_MAPS))
    p.add_argument(
        "--baseline",
        default="half",
        choices=list(FIXED_MAPS),
        help="the map the others are compared with, seed by seed",
    )
    p.add_argument("--designs", nargs="+", default=["decoys", "plain"], choices=("decoys", "plain"))
    p.add_argument("--train-scenes", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=32)
    p.add_argument("--steps", type=int, default=150, help="Adam steps of F (batch 2, 64x64 crops)")
    p.add_argument("--alpha", type=float, default=0.1, help="gradient-term weight of the fusion loss (paper: 1)")
    p.add_argument("--task-epochs", type=int, default=30, help="epochs of the fresh SegFormer-b0")
    p.add_argument(
        "--task-repeats", type=int, default=1, help="fresh SegFormer-b0 networks per map, their scores averaged"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    retain_freed_memory()  # as run.py does: freed activation memory is reused, not faulted in again
    torch.set_num_threads(args.threads)
    started = time.time()
    each = f", the mean of {args.task_repeats} a map" if args.task_repeats > 1 else ""
    print(f"F: {args.steps} steps, alpha {args.alpha}; fresh SegFormer-b0: {args.task_epochs} epochs{each}")
    for design in args.designs:
        decoys = design == "decoys"
        scores: dict[str, list[dict[str, float]]] = {m: [] for m in args.maps}
        print(f"\n## scenes {'with' if decoys else 'without'} single-camera look-alikes ({design})\n")
        print("| seed | map | mIoU | " + " | ".join(f"{c} IoU" for c in SEG_CLASSES) + " |")
        print("|---" * (3 + len(SEG_CLASSES)) + "|")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            train = make_scenes(args.train_scenes, seed=seed, decoys=decoys)
            test = make_scenes(args.test_scenes, seed=seed, start=10_000, decoys=decoys)
            for name in args.maps:
                model = train_fusion_fixed(train, FIXED_MAPS[name], steps=args.steps, alpha=args.alpha, seed=seed)
                fused_train, fused_test = fuse_scenes(model, train), fuse_scenes(model, test)
                result = downstream_miou(
                    fused_train, train, fused_test, test, epochs=args.task_epochs, seed=seed, repeats=args.task_repeats
                )
                row = {"mIoU": result["mIoU"]}
                row |= {c: result["per_class"].get(c, {}).get("IoU", float("nan")) for c in SEG_CLASSES}
                scores[name].append(row)
                cells = " | ".join(f"{row[c]:.1f}" for c in SEG_CLASSES)
                print(f"| {seed} | {name} | {row['mIoU']:.1f} | {cells} |", flush=True)
        print_summary(scores, args.baseline)
    print(f"\n{time.time() - started:.0f} s in all")


def print_summary(scores: dict[str, list[dict[str, float]]], baseline: str) -> None:
    """Mean and spread per map, then each map minus ``baseline`` seed by seed (mean, 95% interval)."""
    columns = ["mIoU", *SEG_CLASSES]
    print("\n| map | " + " | ".join(f"{c} (mean +- sd)" for c in columns) + " |")
    print("|---" * (1 + len(columns)) + "|")
    for name, rows in scores.items():
        cells = []
        for c in columns:
            values = [r[c] for r in rows]
            spread = np.std(values, ddof=1) if len(values) > 1 else float("nan")
            cells.append(f"{np.mean(values):.1f} +- {spread:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if baseline not in scores:
        return
    print(f"\n| map - {baseline} | " + " | ".join(columns) + " |")
    print("|---" * (1 + len(columns)) + "|")
    for name, rows in scores.items():
        if name == baseline:
            continue
        cells = []
        for c in columns:
            mean, low, high = paired_interval([r[c] - b[c] for r, b in zip(rows, scores[baseline])])
            cells.append(f"{mean:+.1f} ({low:+.1f} to {high:+.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"({len(scores[baseline])} seeds; 95% Student-t intervals of the paired differences)")


if __name__ == "__main__":
    main()
