"""The fusion networks and fusion losses of TDFusion and its ablations (Table 3 of the paper)."""

from __future__ import annotations

import argparse
import os

import torch

from metaloss import ConstantWeights, GlobalWeights, LearnableLoss
from metaloss.fusion import LossGenerator, ReFusion, load_released_weights, tdfusion_loss

__all__ = ["ABLATIONS", "WeightedSumFusion", "build_fusion_network", "build_loss", "load_fusion_network"]

ABLATIONS = {
    "none": "TDFusion as published",
    "I": "fixed w_a = w_b = 1/2 (no learnable loss)",
    "II": "no gradient term (alpha = 0)",
    "III": "the fusion network also learns from the task loss",
    "IV": "no separate fusion-learning phase",
    "V": "discriminative fusion: I_f = w_a * I_a + w_b * I_b; the weights' network learns from the task loss and the fixed w = 1/2 fusion loss",  # noqa: E501
}
"""``--ablation`` values and what each changes."""


class WeightedSumFusion(torch.nn.Module):
    """Ablation V: the fused image is ``w_a * A + w_b * B`` with weights from a trainable network."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = LossGenerator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :1], x[:, 1:]
        w = self.weights(a, b)
        return w[:, :1] * a + w[:, 1:] * b


def build_fusion_network(ablation: str) -> torch.nn.Module:
    """ReFusion, or ablation V's weighted sum."""
    return WeightedSumFusion() if ablation == "V" else ReFusion()


def build_loss(args: argparse.Namespace) -> LearnableLoss:
    """The learnable fusion loss for the chosen form, alpha, generator and ablation.

    ``--generator global`` replaces the paper's per-pixel generator with one learned weight per
    source (``metaloss.GlobalWeights``): the baseline that tells whether a per-pixel loss learned
    more than a global preference.
    """
    alpha = 0.0 if args.ablation == "II" else args.alpha
    if args.ablation in ("I", "V"):
        return tdfusion_loss(ConstantWeights(2), form=args.form, alpha=alpha)
    if args.generator == "global":
        return tdfusion_loss(GlobalWeights(2), form=args.form, alpha=alpha, weights="softmax")
    return tdfusion_loss(LossGenerator(), form=args.form, alpha=alpha)


def load_fusion_network(path: str | os.PathLike[str]) -> torch.nn.Module:
    """ReFusion, or ablation V's weighted sum, whichever the checkpoint at ``path`` holds."""
    try:
        return load_released_weights(ReFusion(), path)
    except ValueError as refusion_error:
        try:
            return load_released_weights(WeightedSumFusion(), path)
        except ValueError:
            raise refusion_error from None  # name the network the user most likely meant
