"""Tutorial 3: other fusion tasks, and training on your own paired folders.

Part 1 runs the authors' released ReFusion weights on their three other tasks (the same network,
other weights), with the example's commands, and scores each with the six fusion metrics:

- medical (MIF): ``--a`` CT / PET / SPECT (colour), ``--b`` MRI: the fused image takes the
  colour of the PET image;
- multi-focus (MFIF): ``--a`` near focus, ``--b`` far focus (colour);
- multi-exposure (MEIF): ``--a`` under-exposed, ``--b`` over-exposed (colour).

The weights and test pairs are those of ``../shared/data/ReFusion`` (give ``--refusion DIR``).

Part 2 trains on **your own paired folders**, which carry no labels. A learned loss still needs
something to judge the fused images by. Here the judge is a fixed no-reference objective, in the
spirit of exposure fusion (Mertens et al., 2007): pixels near mid-grey ("well exposed") and
strong local gradients ("detail"). The task model is ``nn.Identity()`` (nothing to train) and the
task loss is minus that objective, so ``G`` learns per-pixel weights that should make ``F``'s
fused images score better on it. Pass ``--learn false`` for the fixed ``w = 1/2`` loss to compare.

Run it from the repository root::

    python examples/tutorials/other_fusion_tasks.py --refusion ../shared/data/ReFusion --out /tmp/other
    python examples/tutorials/other_fusion_tasks.py --a UNDER_DIR --b OVER_DIR --steps 200

What to expect in part 2: the objective on your pairs before and after, and the mean weight on
``--a``. Measured on the two released multi-exposure pairs from the released weights (100 steps):
the fixed loss improved the objective (-0.532 to -0.624), the learned one made it worse (-0.474),
with all its weight on the under-exposed source: the one-step meta-gradient moves ``G``'s global
preference (``docs/tutorials.md``, ``docs/learned-loss-study.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tdfusion"))  # the example's `tdfusion` package

from tdfusion.cli import main as run_py  # noqa: E402  (python examples/tdfusion/run.py ...)
from tdfusion.data import FusionDataset, SceneList, collate, to_unit  # noqa: E402
from tdfusion.datasets import folder_files  # noqa: E402
from tdfusion.study import fuse_scenes  # noqa: E402

from metaloss import ConstantWeights, MetaTrainer, MetaTrainerConfig, SourcesAdapter  # noqa: E402
from metaloss.fusion import LossGenerator, ReFusion, load_released_weights, sobel, tdfusion_loss  # noqa: E402

RELEASED = {
    "MIF": ("ReFusion_MIF.pth", "test_cases/MIF/CT_PET_SPECT", "test_cases/MIF/MRI"),
    "MFIF": ("ReFusion_MFIF.pth", "test_cases/MFIF/near", "test_cases/MFIF/far"),
    "MEIF": ("ReFusion_MEIF.pth", "test_cases/MEIF/under", "test_cases/MEIF/over"),
}
"""Task -> (weights file, ``--a`` folder, ``--b`` folder) inside the release's folder; the source
order is the release's ``test.py``."""


# ------------------------------------------------------------------ part 1: the released weights
def fuse_released(refusion: Path, out: Path, tasks: tuple[str, ...] = tuple(RELEASED)) -> dict[str, dict[str, float]]:
    """Fuse each task's test pairs with its released weights; the six metrics' means per task.

    The same two commands a user types: ``run.py fuse`` (grey ``<name>.png``, colour in ``rgb/``)
    and ``run.py evaluate`` (``metrics.json``).
    """
    means = {}
    for task in tasks:
        weights, a, b = (refusion / part for part in RELEASED[task])
        fused, scores = out / task, out / task / "metrics"
        run_py(["fuse", "--weights", str(weights), "--a", str(a), "--b", str(b), "--out", str(fused), "--quiet"])
        run_py(["evaluate", "--fused", str(fused), "--a", str(a), "--b", str(b), "--out", str(scores), "--quiet"])
        means[task] = json.loads((scores / "metrics.json").read_text())  # one method: its means
    return means


# ------------------------------------------------------------- part 2: training on your folders
def exposure_and_detail(fused: Tensor, batch: Any = None, sigma: float = 0.2) -> Tensor:
    """Minus a no-reference quality of ``fused`` (``(B, 1, H, W)`` in [0, 1]): the mean
    well-exposedness ``exp(-(I - 1/2)^2 / (2 sigma^2))`` plus the mean Sobel gradient magnitude.
    A task loss: ``T`` is ``nn.Identity()``, so this receives the fused task view itself."""
    gx, gy = sobel(fused)
    well_exposed = torch.exp(-((fused - 0.5) ** 2) / (2 * sigma**2)).mean()
    return -(well_exposed + (gx.abs() + gy.abs()).mean())


def train_on_folders(
    a_dir: str | Path,
    b_dir: str | Path,
    *,
    steps: int = 200,
    learn: bool = True,
    init: str | Path | None = None,
    crop: int = 96,
    task_size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> dict[str, float]:
    """Train ReFusion on the pairs of two folders (names matched by stem) under a learned loss
    judged by ``exposure_and_detail`` (``learn=False``: the fixed ``w = 1/2`` loss).

    Args:
        a_dir, b_dir: your folders.
        steps: ordinary steps of ``F`` (and as many meta steps of ``G``; batch 2).
        learn: learn the loss's weights, or keep ``w = 1/2``.
        init: start ``F`` from these weights (a released ``.pth`` or our checkpoint).
        crop: side of the training crops.
        task_size: the size the objective judges whole fused pairs at.
        seed: seeds ``F``, ``G`` and the crops.

    Returns:
        ``objective_before`` / ``objective_after``: ``exposure_and_detail`` (lower is better) on
        the whole pairs fused by ``F``; ``weight_on_a``: the loss's mean weight on ``--a`` there.
    """
    torch.manual_seed(seed)
    scenes = SceneList(folder_files(a_dir, b_dir))
    fusion = ReFusion() if init is None else load_released_weights(ReFusion(), init)
    loss = tdfusion_loss(LossGenerator() if learn else ConstantWeights(2), alpha=0.1)

    def objective() -> float:
        with torch.no_grad():
            values = [float(exposure_and_detail(to_unit(f))) for f in fuse_scenes(fusion, scenes)]
        return sum(values) / len(values)

    def weight_on_a() -> float:
        with torch.no_grad():
            values = [float(loss.weights([to_unit(s.a), to_unit(s.b)])[:, 0].mean()) for s in scenes]
        return sum(values) / len(values)

    before = objective()
    trainer = MetaTrainer(
        fusion,
        loss,
        nn.Identity(),  # a fixed judge: nothing to train
        exposure_and_detail,  # the task loss: exposure_and_detail(fused task view, batch)
        FusionDataset(scenes, None, crop=crop, task_size=task_size),  # no labels
        collate_fn=collate,
        adapter=SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b")),
        config=MetaTrainerConfig(
            epochs=1,
            meta_iterations=steps if learn else 0,
            model_iterations=steps,
            batch_size=min(2, len(scenes)),
            lr=1e-3,
            outer_lr=3e-4,
            progress=False,
            seed=seed,
        ),
    )
    trainer.fit()
    fusion.train()
    return {"objective_before": before, "objective_after": objective(), "weight_on_a": weight_on_a()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refusion", type=Path, help="part 1: the folder of the released weights and test pairs")
    p.add_argument("--out", type=Path, default=Path("tdfusion_out/other_tasks"), help="part 1: output folder")
    p.add_argument("--a", help="part 2: your first source folder (e.g. under-exposed)")
    p.add_argument("--b", help="part 2: your second source folder (e.g. over-exposed)")
    p.add_argument("--steps", type=int, default=200, help="part 2: training steps")
    p.add_argument("--learn", choices=("true", "false"), default="true", help="part 2: learned or fixed w = 1/2")
    p.add_argument("--init", help="part 2: start F from these weights (e.g. ReFusion_MEIF.pth)")
    args = p.parse_args()
    if args.refusion is None and args.a is None:
        p.error("give --refusion DIR (part 1) and/or --a DIR --b DIR (part 2)")
    if args.refusion is not None:
        for task, mean in fuse_released(args.refusion, args.out).items():
            print(f"{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) + f"  ({args.out / task})")
    if args.a is not None:
        if args.b is None:
            p.error("--a needs --b")
        r = train_on_folders(args.a, args.b, steps=args.steps, learn=args.learn == "true", init=args.init)
        print(
            f"objective on your pairs (lower is better): {r['objective_before']:.4f} -> {r['objective_after']:.4f}; "
            f"mean weight on --a: {r['weight_on_a']:.2f}"
        )
