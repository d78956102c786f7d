"""Tutorial 2: your own task network and task loss.

The task network ``T`` is any ``nn.Module``, and the task loss any callable
``loss(output, batch) -> scalar`` that receives ``T``'s output and the whole batch. Nothing else
is asked of either: no base class, no registration. This script trains TDFusion on the
procedural scenes of the demo with two task networks of your own:

- ``smp``: a segmentation-models-pytorch FPN with a ResNet-18 encoder that expects **three**
  input channels (as ImageNet encoders do), fed the one-channel fused image through a small
  wrapper, and trained with smp's Dice loss plus cross-entropy;
- ``tiny``: a three-layer network written here, with a focal loss written here.

Swap in yours the same way. Pretrained encoder weights are a user option
(``encoder_weights="imagenet"`` downloads them; we pass ``None`` so nothing is downloaded).

Run it from the repository root::

    python examples/tutorials/your_own_task_network.py --task smp --epochs 2
    python examples/tutorials/your_own_task_network.py --task tiny --epochs 2

It prints ``T``'s mIoU on fused held-out scenes before and after training, and where the learned
loss puts its weight. Expect a small number after two CPU epochs: this shows the wiring, not
the method's value (see ``docs/learned-loss-study.md`` for what we measured about that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tdfusion"))  # the example's `tdfusion` package

from tdfusion.data import FusionDataset, collate  # noqa: E402
from tdfusion.downstream import evaluate_task  # noqa: E402
from tdfusion.study import fuse_scenes, weights_at  # noqa: E402
from tdfusion.synthetic import SEG_CLASSES, make_scenes  # noqa: E402
from tdfusion.tasks import Task  # noqa: E402

from metaloss import MetaTrainer, MetaTrainerConfig, SourcesAdapter  # noqa: E402
from metaloss.fusion import LossGenerator, ReFusion, tdfusion_loss  # noqa: E402

TASK_SIZE = (96, 128)  # the procedural scenes' size; smp needs sides divisible by 32


class GreyToRGB(nn.Module):
    """Feed a one-channel image to a network that expects three (an ImageNet encoder)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def dice_and_cross_entropy(output: Tensor, batch: dict[str, Any]) -> Tensor:
    """smp's multi-class Dice loss plus cross-entropy; ``batch["mask"]`` holds the class ids."""
    dice = smp.losses.DiceLoss(mode="multiclass")
    return dice(output, batch["mask"]) + F.cross_entropy(output, batch["mask"])


class TinySegmenter(nn.Module):
    """A task network of your own: any module that maps the fused image to what your loss needs."""

    def __init__(self, classes: int, width: int = 24) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def focal_loss(output: Tensor, batch: dict[str, Any], gamma: float = 2.0) -> Tensor:
    """A task loss of your own: focal loss (Lin et al., 2017) on per-pixel class logits."""
    log_p = F.log_softmax(output, dim=1).gather(1, batch["mask"][:, None])[:, 0]
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def build_task(name: str) -> Task:
    """``T`` and its loss for ``name``: ``"smp"`` or ``"tiny"``."""
    classes = len(SEG_CLASSES)
    if name == "smp":
        fpn = smp.FPN("resnet18", encoder_weights=None, in_channels=3, classes=classes)
        return Task(name, "seg", GreyToRGB(fpn), dice_and_cross_entropy)
    if name == "tiny":
        return Task(name, "seg", TinySegmenter(classes), focal_loss)
    raise ValueError(f"unknown task {name!r}; choose 'smp' or 'tiny'")


def miou(task: Task, fusion: nn.Module, scenes: list[Any]) -> float:
    """``task``'s mean IoU (%) on ``scenes`` fused by ``fusion`` (then back to training mode)."""
    with torch.no_grad():
        scores = evaluate_task(task, fuse_scenes(fusion, scenes), scenes, SEG_CLASSES, TASK_SIZE)
    task.model.train()
    return float(scores["mIoU"])


def train(
    task: str = "smp", epochs: int = 2, seed: int = 0, meta_iterations: int = 10, scenes: int = 16
) -> dict[str, float]:
    """Train F, G and your T with Algorithm 1 on procedural scenes; T's mIoU before and after."""
    torch.manual_seed(seed)
    my_task = build_task(task)
    train_scenes = make_scenes(scenes, size=TASK_SIZE, seed=seed)
    test_scenes = make_scenes(8, size=TASK_SIZE, seed=seed, start=10_000)
    fusion, loss = ReFusion(), tdfusion_loss(LossGenerator(), alpha=0.1)
    trainer = MetaTrainer(
        fusion,
        loss,
        my_task.model,
        my_task.loss,  # called as loss(T(fused task view), batch)
        FusionDataset(train_scenes, "seg", crop=64, task_size=TASK_SIZE),
        collate_fn=collate,
        # the fusion loss sees the crops "a"/"b"; T sees the fused whole scene "task_a"/"task_b"
        adapter=SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b")),
        config=MetaTrainerConfig(
            epochs=epochs, meta_iterations=meta_iterations, batch_size=2, lr=2e-3, outer_lr=3e-4, progress=False
        ),
    )
    before = miou(my_task, fusion, test_scenes)
    trainer.fit()
    weights = weights_at(loss, test_scenes)
    return {
        "miou_before": before,
        "miou_after": miou(my_task, fusion, test_scenes),
        "target_infrared": weights["target_infrared"],
        "marking_visible": weights["marking_visible"],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("smp", "tiny"), default="smp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--meta-iterations", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    r = train(args.task, args.epochs, args.seed, args.meta_iterations)
    print(
        f"{args.task}: T's mIoU on fused held-out scenes {r['miou_before']:.1f} -> {r['miou_after']:.1f} %; "
        f"the learned loss puts w_infrared = {r['target_infrared']:.2f} on hot targets and "
        f"w_visible = {r['marking_visible']:.2f} on markings"
    )
