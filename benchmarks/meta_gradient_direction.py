"""Does the meta-gradient head for the oracle maps? Pair by pair, for task networks of known skill.

The learned loss moves its weight maps along the meta-gradient of one or a few (meta-train,
meta-test) pairs per outer step. This measures, at a fixed state, where that gradient points and
how much it varies from pair to pair:

1. ``F`` is trained under ``w = 1/2`` (``--fusion-steps`` Adam steps: the state a learned loss
   starts from after the demo's warm-up), and under each ``--judges`` map;
2. a fresh task network (the "judge") is trained on each map's fused training scenes, as in the
   paper's downstream protocol, so its skill (its mIoU on the fused test scenes) is known;
3. with ``F`` from step 1's ``w = 1/2``, the demo's loss generator at its initial weights
   (about 1/2) and each judge as ``T``, the meta step's map gradient is taken on ``--pairs``
   random pairs (meta-train from one half of the training scenes, meta-test from the other, as
   ``MetaTrainer`` draws them) and compared with the direction toward the oracle maps
   (``tdfusion.study.oracle_agreement``).

For contrast, rows "objective: ..." replace the judge by a fixed objective with a known answer
(``T`` the identity; the task loss rewards brighter targets, brighter markings or a darker
background in ``F'``'s meta-test images): they show which per-pixel maps the meta-gradient can
tell apart at all.

Per seed, judge and task adaptation it prints the mean and standard deviation over pairs of the
cosine to the oracle direction, the share of pairs whose cosine is positive, the mean target and
marking shares (1: every such pixel pushed toward the oracle's source; the markings' also by day
and by night apart, as visible light is the brighter source there by day only), the same share
toward visible light on the road within 3 pixels of a marking and on the rest of the background,
by day and by night (does the road beside a marking ask what the marking asks?), the same share
on the cold look-alikes and on the hot seams by day (a cold look-alike is, pixel by pixel, what a
marking is by day: bright in visible light only; a hot seam what a target is), the cosine between the
meta-gradient and the sources' difference (near +-1: it asks only "the brighter source" or "the
darker source" everywhere), the cosine to the oracle of what is left once that part is removed,
and how many pairs an outer step would have to average for the sign of its cosine to match the
mean's 19 times in 20 ((1.645 sd / mean)^2, a normal approximation).

    python benchmarks/meta_gradient_direction.py --seeds 3 -- --alpha 0.01 --virtual-step model
    python benchmarks/meta_gradient_direction.py --seeds 3 --adaptations current_model -- --alpha 0.01

With ``--virtual-step output`` (the demo's default) the map gradient covers the meta-train batch's task view (the
whole scene), and the cosines are taken there.

Options after ``--`` go to the demo (``run.py demo --help``): they set the scenes, ``F``'s loss,
the generator and the meta step (``--task-adaptation`` and ``--task-inner-lr`` are set per row by
``--adaptations`` and ``--task-inner-lr`` here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tdfusion.catalog import DATASETS, load_scenes  # noqa: E402
from tdfusion.cli import build_parser  # noqa: E402
from tdfusion.commands.train import build_trainer  # noqa: E402
from tdfusion.data import FusionDataset, Scene, collate  # noqa: E402
from tdfusion.study import FIXED_MAPS, downstream_miou, fuse_scenes, oracle_agreement, train_fusion_fixed  # noqa: E402
from tdfusion.synthetic import SEG_CLASSES  # noqa: E402
from tdfusion.tasks import build_task  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from metaloss import InnerSGD, MetaStep  # noqa: E402
from metaloss.allocator import retain_freed_memory  # noqa: E402


def random_pairs(scenes: Sequence[Scene], crop: int, batch_size: int, count: int, seed: int) -> list[tuple[dict, dict]]:
    """``count`` collated (meta-train, meta-test) pairs: random samples of the first and the
    second half of ``scenes``, random crops, as ``MetaTrainer`` pairs them."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the crops' windows
    dataset = FusionDataset(scenes, "seg", crop=crop, task_size=DATASETS["synthetic"]["task_size"])
    half = len(dataset) // 2

    def batch(low: int, high: int) -> dict:
        return collate([dataset[int(torch.randint(low, high, (), generator=generator))] for _ in range(batch_size)])

    return [(batch(0, half), batch(half, len(dataset))) for _ in range(count)]


OBJECTIVES = {"brighter targets": ((1, 2), -1.0), "brighter markings": ((3,), -1.0), "darker background": ((0,), 1.0)}
"""Fixed objectives: the classes whose mean fused intensity the task loss moves, and its sign."""


def brightness_objective(classes: tuple[int, ...], sign: float) -> Callable[[Tensor, dict], Tensor]:
    """A task loss on ``T``'s output (here the fused image itself): ``sign`` times the mean fused
    intensity over the meta-test pixels of ``classes``."""

    def loss(fused: Tensor, batch: dict) -> Tensor:
        pixels = torch.isin(batch["mask"], torch.tensor(classes, device=fused.device))
        return sign * fused[:, 0][pixels].mean()

    return loss


def _mean_of_present(values: list[float]) -> float:
    """The mean over the values that are not ``nan`` (``nan`` when none is: a region no pair holds)."""
    present = [v for v in values if not np.isnan(v)]
    return float(np.mean(present)) if present else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds (scenes, networks, pairs)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=24, help="(meta-train, meta-test) pairs per row")
    p.add_argument("--judges", nargs="+", default=["half", "oracle_hiding"], choices=list(FIXED_MAPS))
    adaptations = ("current_model", "virtual_model")
    p.add_argument("--adaptations", nargs="+", default=list(adaptations), choices=adaptations)
    p.add_argument("--task-inner-lr", type=float, default=0.1, help="T's virtual step with virtual_model")
    p.add_argument("--fusion-steps", type=int, default=150, help="Adam steps of F under each fixed map")
    p.add_argument("--task-epochs", type=int, default=30, help="epochs of each judge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("demo_options", nargs=argparse.REMAINDER, help="after --: options of run.py demo")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    extra = [a for a in args.demo_options if a != "--"]
    out = Path(tempfile.mkdtemp(prefix="meta_gradient_direction-"))
    print(f"demo options: {' '.join(extra) or '(defaults)'}; {args.pairs} pairs per row")
    print(
        "\n| seed | T's virtual step | judge trained on | judge mIoU | cos to oracle, mean (sd) | pairs with cos > 0 "
        "| target share | marking share (day, night) | road beside markings, toward visible (day, night) "
        "| rest of background, toward visible (day, night) | look-alikes by day, toward visible (cold, hot seams) "
        "| cos to brighter source | residual cos to oracle | pairs to average |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    started = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = ["demo", *extra, "--seed", str(seed), "--quiet", "--out", str(out / f"seed{seed}")]
        demo = build_parser().parse_args(base)
        train, test = load_scenes(demo, "train", "seg"), load_scenes(demo, "test", "seg")
        fusion = {
            name: train_fusion_fixed(train, FIXED_MAPS[name], steps=args.fusion_steps, alpha=demo.alpha, seed=seed)
            for name in dict.fromkeys(["half", *args.judges])
        }
        judges = {}
        for name in args.judges:
            task = build_task(demo.task_net, len(SEG_CLASSES))
            scores = downstream_miou(
                fuse_scenes(fusion[name], train), train, fuse_scenes(fusion[name], test), test,
                epochs=args.task_epochs, seed=seed, task=task,
            )  # fmt: skip
            judges[name] = (task.model, scores["mIoU"])
        pairs = random_pairs(train, demo.crop, demo.batch_size, args.pairs, seed)
        for adaptation in args.adaptations:
            options = ["--task-adaptation", adaptation, "--task-inner-lr", str(args.task_inner_lr)]
            trainer = build_trainer(build_parser().parse_args(base + options))
            trainer.model.load_state_dict(fusion["half"].state_dict())
            runs: list[tuple[str, str, MetaStep, nn.Module | None]] = [
                (name, f"{miou:.1f}", trainer.meta_step, judge) for name, (judge, miou) in judges.items()
            ]
            if adaptation == args.adaptations[0]:  # without a task network the adaptation does not matter
                for name, (classes, sign) in OBJECTIVES.items():
                    objective = MetaStep(  # the demo's meta-step options, T the identity
                        trainer.model, trainer.loss, nn.Identity(), brightness_objective(classes, sign),
                        adapter=trainer.adapter, inner=InnerSGD(demo.inner_lr), mode=demo.mode,
                        inner_steps=demo.inner_steps, map_gradient=demo.map_gradient,
                        virtual_step=demo.virtual_step, output_lr=demo.output_lr,
                    )  # fmt: skip
                    runs.append((f"objective: {name}", "-", objective, None))
            for name, skill, meta_step, judge in runs:
                if judge is not None:
                    trainer.task_model.load_state_dict(judge.state_dict())
                trainer.model.train()
                trainer.task_model.train()
                rows = [oracle_agreement(meta_step, *pair) for pair in pairs]
                cos = np.array([r["cos_to_oracle"] for r in rows])
                mean, sd = float(cos.mean()), float(cos.std(ddof=1))
                needed = (1.645 * sd / mean) ** 2 if mean else float("inf")
                print(
                    f"| {seed} | {adaptation if judge else '-'} | {name} | {skill} | {mean:+.2f} ({sd:.2f}) "
                    f"| {(cos > 0).mean():.2f} "
                    f"| {_mean_of_present([r['target_share'] for r in rows]):+.2f} "
                    f"| {_mean_of_present([r['marking_share'] for r in rows]):+.2f} "
                    f"({_mean_of_present([r['marking_share_day'] for r in rows]):+.2f}, "
                    f"{_mean_of_present([r['marking_share_night'] for r in rows]):+.2f}) "
                    f"| {_mean_of_present([r['surround_share_day'] for r in rows]):+.2f}, "
                    f"{_mean_of_present([r['surround_share_night'] for r in rows]):+.2f} "
                    f"| {_mean_of_present([r['background_share_day'] for r in rows]):+.2f}, "
                    f"{_mean_of_present([r['background_share_night'] for r in rows]):+.2f} "
                    f"| {_mean_of_present([r['cold_lookalike_share_day'] for r in rows]):+.2f}, "
                    f"{_mean_of_present([r['hot_seam_share_day'] for r in rows]):+.2f} "
                    f"| {np.mean([r['cos_to_brighter'] for r in rows]):+.2f} "
                    f"| {np.mean([r['residual_cos_to_oracle'] for r in rows]):+.2f} | {needed:.0f} |",
                    flush=True,
                )
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
