"""How much per-pixel source choice can matter on the procedural scenes: fixed weight maps.

For each fixed weight map (the oracle from each scene's ground truth: w_infrared = 1 on hot
targets, w_visible = 1 on markings, 1/2 elsewhere; w = 1/2; infrared only; visible only) and each
scene design (with and without the single-camera look-alikes), train ReFusion under the TDFusion
loss with that map, fuse the training and test scenes, train a *fresh* SegFormer-b0 on the fused
training scenes and score it on the fused test scenes (the paper's downstream protocol, section
4.3). Prints mIoU and per-class IoU per seed, then the mean over seeds and the paired difference
oracle - half with its 95% interval.

    python benchmarks/oracle_weights.py --seeds 3
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (scenes, F and the task network)")
    p.add_argument("--maps", nargs="+", default=list(FIXED_MAPS), choices=list(FIXED_MAPS))
    p.add_argument("--designs", nargs="+", default=["decoys", "plain"], choices=("decoys", "plain"))
    p.add_argument("--train-scenes", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=32)
    p.add_argument("--steps", type=int, default=150, help="Adam steps of F (batch 2, 64x64 crops)")
    p.add_argument("--alpha", type=float, default=0.1, help="gradient-term weight of the fusion loss (paper: 1)")
    p.add_argument("--task-epochs", type=int, default=30, help="epochs of the fresh SegFormer-b0")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    print(f"F: {args.steps} steps, alpha {args.alpha}; fresh SegFormer-b0: {args.task_epochs} epochs")
    for design in args.designs:
        decoys = design == "decoys"
        scores: dict[str, list[float]] = {m: [] for m in args.maps}
        print(f"\n## scenes {'with' if decoys else 'without'} single-camera look-alikes ({design})\n")
        print("| seed | map | mIoU | " + " | ".join(f"{c} IoU" for c in SEG_CLASSES) + " |")
        print("|---" * (3 + len(SEG_CLASSES)) + "|")
        for seed in range(args.seeds):
            train = make_scenes(args.train_scenes, seed=seed, decoys=decoys)
            test = make_scenes(args.test_scenes, seed=seed, start=10_000, decoys=decoys)
            for name in args.maps:
                model = train_fusion_fixed(train, FIXED_MAPS[name], steps=args.steps, alpha=args.alpha, seed=seed)
                result = downstream_miou(
                    fuse_scenes(model, train), train, fuse_scenes(model, test), test, epochs=args.task_epochs, seed=seed
                )
                scores[name].append(result["mIoU"])
                cells = [f"{result['per_class'].get(c, {}).get('IoU', float('nan')):.1f}" for c in SEG_CLASSES]
                print(f"| {seed} | {name} | {result['mIoU']:.1f} | " + " | ".join(cells) + " |", flush=True)
        print("\n| map | mean mIoU | std |\n|---|---|---|")
        for name, values in scores.items():
            spread = np.std(values, ddof=1) if len(values) > 1 else float("nan")
            print(f"| {name} | {np.mean(values):.1f} | {spread:.1f} |")
        if "oracle" in scores and "half" in scores:
            mean, low, high = paired_interval([o - h for o, h in zip(scores["oracle"], scores["half"])])
            print(
                f"\noracle - half: {mean:+.1f} mIoU points (95% interval {low:+.1f} to {high:+.1f}, {args.seeds} seeds)"
            )
    print(f"\n{time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()
