"""Does one-step meta-learning find the informative source when the answer is obvious?

The toy of tutorial 1 (``examples/tutorials/meta_step_in_your_loop.py``): source ``a`` shows a
bright square, source ``b`` is noise. ``G`` should learn to weigh ``a``; the three networks train
together as in TDFusion's Algorithm 1. For each variant of the meta step and each seed, prints the
mean weight on ``a`` and the task network's IoU on held-out pairs after the run, and how many
seeds chose ``a`` (weight > 0.9).

    python benchmarks/toy_source_choice.py --seeds 6
    python benchmarks/toy_source_choice.py --seeds 6 --first-seed 6 --only paper "100 steps first"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tutorials"))

import torch  # noqa: E402
from meta_step_in_your_loop import train  # noqa: E402

ADAPTS = {"task_adaptation": "virtual_model"}
VARIANTS: dict[str, dict[str, Any]] = {
    "no meta step (G keeps its initial weights, about 1/2)": {"warmup": 10**9},
    "paper (one step, held-out meta-test)": {},
    "T and F warmed up 100 steps first": {"warmup": 100},
    "warm-up, G's lr 1e-3": {"warmup": 100, "outer_lr": 1e-3},
    "meta-test = meta-train batch": {"meta_test": "meta_train"},
    "centred map gradient": {"map_gradient": "centred"},
    "warm-up and centred map gradient": {"warmup": 100, "map_gradient": "centred"},
    "3 unrolled inner steps": {"inner_steps": 3},
    "T adapts on F' (differentiated)": {"task_adaptation": "virtual_model"},
    "T adapts on F', T's step 0.1": {"task_adaptation": "virtual_model", "task_inner_lr": 0.1},
    "T adapts on F', T's step 1": {"task_adaptation": "virtual_model", "task_inner_lr": 1.0},
    "warm-up, T adapts on F' (T's lr)": {"warmup": 100, "task_adaptation": "virtual_model"},
    **{
        f"warm-up, T adapts on F', T's step {lr:g}": {**ADAPTS, "warmup": 100, "task_inner_lr": lr}
        for lr in (0.03, 0.1, 0.3, 1.0)
    },
    "virtual step of the output": {"virtual_step": "output"},
    "warm-up, virtual step of the output": {"warmup": 100, "virtual_step": "output"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, metavar="WORD", help="run the variants whose name holds a WORD")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trace", type=int, default=None, metavar="SEED", help="print G's path in the paper's loop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.trace is not None:
        path: list[tuple[int, float, float]] = []
        train(steps=args.steps, seed=args.trace, trace=path)
        print(f"seed {args.trace}, the paper's loop: iteration, mean weight on a, norm of G's meta-gradient")
        print("\n".join(f"{i:4d}  {w:.2f}  {g:.1e}" for i, w, g in path))
        return
    print("| variant | weight on a / IoU per seed | seeds choosing a |\n|---|---|---|")
    for name, options in VARIANTS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        if "warmup" in options:
            options = {**options, "warmup": min(options["warmup"], args.steps)}
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        runs = [train(steps=args.steps, seed=s, **options) for s in seeds]
        cells = " ".join(f"{r['weight_on_a_end']:.2f}/{r['iou_end']:.2f}" for r in runs)
        chose = sum(r["weight_on_a_end"] > 0.9 for r in runs)
        print(f"| {name} | {cells} | {chose} of {args.seeds} |", flush=True)
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
