"""Tutorial 1: the meta step in your own training loop (no MetaTrainer), training all three networks.

A toy two-source problem, small enough for a CPU in seconds. Source ``a`` shows a bright square on
a dim background; source ``b`` is noise that says nothing about it. A fusion network ``F`` merges
the two under a learnable loss whose generator ``G`` weighs them per pixel; a segmenter ``T``
finds the square in ``F``'s output. ``G`` learns, through ``T``'s loss, to weigh source ``a``.

Each iteration of the loop below does the three things of TDFusion's Algorithm 1 with your own
optimisers:

1. ``meta.step(train_batch, test_batch)``: one outer step of ``G`` (its meta-gradient through a
   differentiable virtual step of ``F``; ``F`` and ``T`` are not modified);
2. one ordinary step of ``F`` under the learned loss (the weights detached);
3. one ordinary step of ``T`` on ``F``'s detached output.

Run it: ``python examples/tutorials/meta_step_in_your_loop.py --steps 300``. It prints the mean
weight ``G`` gives source ``a`` and ``T``'s IoU on held-out pairs, at the start and at the end.

What to expect (``benchmarks/toy_source_choice.py`` measures it over seeds): the loop often ends
with ``G`` on the *noise* source. The one-step meta-gradient asks what helps the *current* ``T``,
and an untrained ``T`` is helped by hiding the squares; ``G``'s softmax then saturates on one
source, where its gradient vanishes. Warming ``F`` and ``T`` up first (``--warmup 100``) helps.
A virtual step of ``F``'s *output* instead of its parameters (``--virtual-step output``, the
TDFusion demo's default) asks ``T`` pixel by pixel, and chose ``a`` in 23 of 24 seeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss import InnerSGD, LearnableLoss, MetaStep, VirtualStep
from metaloss.map_gradient import MapGradient
from metaloss.meta_step import VIRTUAL_STEPS


def make_batch(batch_size: int, size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Dict batches: the engine's default adapter reads the sources from keys ``"a"`` and ``"b"``."""
    target = torch.zeros(batch_size, size, size, dtype=torch.long)
    for i in range(batch_size):
        y, x = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        target[i, y : y + 6, x : x + 6] = 1
    a = 0.2 + 0.6 * target[:, None].float() + 0.05 * torch.randn(batch_size, 1, size, size, generator=generator)
    b = torch.rand(batch_size, 1, size, size, generator=generator)
    return {"a": a, "b": b, "target": target}


def weighted_squared_error(prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """A loss term: ``mean_px sum_k w_k (F - I_k)^2``. ``weights`` is ``(B, K, H, W)``, summing to 1 over K."""
    stacked = torch.stack(list(sources), dim=1)  # (B, K, 1, H, W)
    return (weights.unsqueeze(2) * (prediction.unsqueeze(1) - stacked) ** 2).sum(1).mean()


def task_loss(output: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """The task loss receives the task model's output and the whole batch."""
    return F.cross_entropy(output, batch["target"])


def conv_net(inputs: int, outputs: int, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(inputs, width, 3, padding=1), nn.Softplus(), nn.Conv2d(width, outputs, 3, padding=1))


class Generator(nn.Module):
    """``G``: called with the K sources, returns K-channel logits (the loss applies the softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(2, 2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.net(torch.cat([a, b], dim=1))


def iou(task_model: nn.Module, fusion: nn.Module, batch: dict[str, Tensor]) -> float:
    with torch.no_grad():
        predicted = task_model(fusion(torch.cat([batch["a"], batch["b"]], 1))).argmax(1)
    hit = ((predicted == 1) & (batch["target"] == 1)).sum()
    union = ((predicted == 1) | (batch["target"] == 1)).sum()
    return float(hit / union.clamp(min=1))


def train(
    steps: int = 300,
    seed: int = 0,
    *,
    warmup: int = 0,
    outer_lr: float = 3e-3,
    inner_steps: int = 1,
    meta_test: str = "held_out",
    map_gradient: MapGradient = "full",
    task_adaptation: Literal["current_model", "virtual_model"] = "current_model",
    task_inner_lr: float | None = None,
    virtual_step: VirtualStep = "model",
    trace: list[tuple[int, float, float]] | None = None,
) -> dict[str, float]:
    """Train F, G and T together; return G's weight on source ``a`` and T's IoU, before and after.

    Args:
        steps: loop iterations.
        seed: seeds the networks and the batches.
        warmup: first iterations without the meta step (F and T learn at G's initial weights).
        outer_lr: G's Adam learning rate.
        inner_steps: virtual steps of F per meta step (unrolled).
        meta_test: ``"held_out"`` (a fresh batch judges F') or ``"meta_train"`` (the same batch).
        map_gradient: ``"full"``, ``"centred"`` or ``"shift_removed"`` (see ``metaloss.MetaStep``).
        task_adaptation: ``"current_model"`` (the paper) or ``"virtual_model"`` (see
            ``metaloss.MetaStep``).
        task_inner_lr: the step size of T's virtual step (``None``: T's learning rate).
        virtual_step: ``"model"`` (the paper: F's parameters) or ``"output"`` (F's output,
            pixel by pixel; see ``metaloss.MetaStep``).
        trace: if given, every 20th meta step appends ``(iteration, mean weight on a in the
            meta-train batch, norm of G's meta-gradient)`` to it.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    fusion, task_model = conv_net(2, 1), conv_net(1, 2)  # F: both sources concatenated -> 1 channel
    loss = LearnableLoss(Generator(), {"intensity": weighted_squared_error})
    opt_f = torch.optim.Adam(fusion.parameters(), lr=3e-3)
    opt_t = torch.optim.Adam(task_model.parameters(), lr=3e-3)
    opt_g = torch.optim.Adam(loss.parameters(), lr=outer_lr)
    meta = MetaStep(
        fusion,
        loss,
        task_model,
        task_loss,
        outer_optimizer=opt_g,
        model_optimizer=opt_f,
        task_optimizer=opt_t,
        inner=InnerSGD(),  # a virtual SGD step at F's learning rate (the default, shown here)
        task_inner=InnerSGD(task_inner_lr),
        task_adaptation=task_adaptation,
        inner_steps=inner_steps,
        map_gradient=map_gradient,
        virtual_step=virtual_step,
    )
    held_out = make_batch(16, 16, g)

    def weight_on_a() -> float:
        with torch.no_grad():
            return float(loss.weights([held_out["a"], held_out["b"]])[:, 0].mean())

    report = {"weight_on_a_start": weight_on_a(), "iou_start": iou(task_model, fusion, held_out)}
    for i in range(steps):
        train_batch, test_batch = make_batch(4, 16, g), make_batch(4, 16, g)
        if i >= warmup:  # 1. G's outer step; F and T are not modified by it
            stats = meta.step(train_batch, train_batch if meta_test == "meta_train" else test_batch)
            if trace is not None and (i - warmup) % 20 == 0:
                trace.append((i, stats.weight_mean[0], stats.hypergrad_norm))

        sources = [train_batch["a"], train_batch["b"]]
        fused = fusion(torch.cat(sources, dim=1))
        out = loss(sources, fused, detach_weights=True)  # 2. F learns under G's loss
        opt_f.zero_grad()
        out.total.backward()
        opt_f.step()

        t_loss = task_loss(task_model(fused.detach()), train_batch)  # 3. T learns on F's output
        opt_t.zero_grad()
        t_loss.backward()
        opt_t.step()
    report |= {"weight_on_a_end": weight_on_a(), "iou_end": iou(task_model, fusion, held_out)}
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="first iterations without the meta step")
    p.add_argument(
        "--virtual-step",
        choices=VIRTUAL_STEPS,
        default="model",
        help="the meta step's virtual step: model (the paper's: F's parameters) or output (F's output, per pixel)",
    )
    args = p.parse_args()
    result = train(args.steps, args.seed, warmup=args.warmup, virtual_step=args.virtual_step)
    print(
        f"weight on source a: {result['weight_on_a_start']:.2f} -> {result['weight_on_a_end']:.2f}; "
        f"T's IoU on held-out pairs: {result['iou_start']:.2f} -> {result['iou_end']:.2f}"
    )
