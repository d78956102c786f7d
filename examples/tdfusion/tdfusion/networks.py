"""The fusion networks and fusion losses of TDFusion and its ablations (Table 3 of the paper)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from metaloss import ConstantWeights, GlobalWeights, LearnableLoss, checkpointed_call
from metaloss.checkpoint import load_module_state
from metaloss.fusion import LossGenerator, ReFusion, load_released_weights, tdfusion_loss
from metaloss.learnable_loss import check_source_weights

__all__ = [
    "ABLATIONS",
    "GENERATORS",
    "LogitPrior",
    "PerPixelPlusUnetGenerator",
    "UnetLossGenerator",
    "WeightedSumFusion",
    "build_fusion_network",
    "build_loss",
    "load_fusion_network",
]

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


class UnetLossGenerator(torch.nn.Module):
    """A loss generator that sees shapes: a U-Net over both sources, one logit map per source.

    The paper's ``LossGenerator`` works at full resolution (3x3 convolutions and Restormer
    blocks, whose attention mixes channels, not places), so what it sees of a pixel's
    neighbourhood is a few pixels across. This one is segmentation-models-pytorch's ``Unet``
    (``encoder_weights=None``: nothing is downloaded) on the two sources stacked, with a
    ``depth``-level encoder: it sees a region tens of pixels across, enough for the shape of
    a marking or a person. Its batch normalisations are replaced by group normalisations (up to 8
    groups), so a scene's weights do not depend on the other scenes of its batch, nor on a
    train or eval mode. Its head starts at zero, so its first weights are ``1/2`` everywhere
    (the fixed loss). Use it with ``tdfusion_loss(..., weights="softmax")``. Inputs whose sides
    are not multiples of ``2 ** depth`` are padded (edge pixels repeated) and the output cropped
    back.

    Args:
        encoder: an encoder name of segmentation-models-pytorch.
        depth: encoder levels (each halves the resolution).
        checkpoint_blocks: recompute the U-Net's activations in each backward pass instead of
            keeping them (the whole U-Net as one block, ``metaloss.checkpointed_call``), as
            ``LossGenerator(checkpoint_blocks=True)`` does block by block.
    """

    def __init__(self, encoder: str = "resnet18", depth: int = 3, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.multiple = 2**depth
        self.net = smp.Unet(
            encoder_name=encoder,
            encoder_weights=None,
            encoder_depth=depth,
            decoder_channels=tuple(16 * 2 ** (depth - 1 - i) for i in range(depth)),
            in_channels=2,
            classes=2,
        )
        for unused in range(depth, 5):  # a ResNet encoder keeps the stages its depth does not reach
            if hasattr(self.net.encoder, f"layer{unused}"):
                delattr(self.net.encoder, f"layer{unused}")
        _batch_norms_to_group_norms(self.net)
        head = self.net.segmentation_head[0]
        torch.nn.init.zeros_(head.weight)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h, w = a.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        x = torch.cat([a, b], dim=1)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        logits: torch.Tensor = checkpointed_call(self.net, x) if self.checkpoint_blocks else self.net(x)
        return logits[..., :h, :w]


class PerPixelPlusUnetGenerator(torch.nn.Module):
    """The paper's ``LossGenerator`` with a ``UnetLossGenerator``'s logits added before the softmax.

    Returns logits ``z + u``: the paper's logits ``z = G.logits(a, b)`` (before its softmax) plus
    ``u = U(a, b)`` (use with ``weights="softmax"``), so its weights are ``softmax(z + u)``: at
    first exactly the paper's generator's (``U``'s head starts at zero), and what the U-Net learns
    (shapes) adds to what the paper's network learns (each pixel and, through its channel
    attention, each scene as a whole). ``checkpoint_blocks`` reaches both networks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_pixel = LossGenerator()
        self.unet = UnetLossGenerator()

    @property
    def checkpoint_blocks(self) -> bool:
        return self.per_pixel.checkpoint_blocks

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, value: bool) -> None:
        self.per_pixel.checkpoint_blocks = self.unet.checkpoint_blocks = value

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.per_pixel.logits(a, b) + self.unet(a, b)
        return logits


class LogitPrior(torch.nn.Module):
    """A loss generator whose weights start near fixed prior weights: its logits plus their logarithms.

    Returns ``z + log(prior)`` (use with ``weights="softmax"``), where ``z`` is the wrapped
    generator's logits (``LossGenerator.logits`` for the paper's network, the output of a
    generator that returns logits otherwise), so the weights are ``softmax(z + log prior)``: the
    prior where ``z`` is equal across sources (a U-Net's zero head at first), moved from there by
    what ``G`` learns. ``--prior-weights 0.95 0.05`` starts the learned loss near the fixed
    infrared-only loss and lets it learn where to depart from it (docs/learned-loss-study.md,
    section 12).

    Args:
        generator: the loss generator (``LossGenerator`` or one that returns logits).
        prior: one positive weight per source, summing to 1.
    """

    def __init__(self, generator: torch.nn.Module, prior: tuple[float, ...]) -> None:
        super().__init__()
        prior = check_source_weights(prior, positive=True, name="prior weights")
        self.generator = generator
        self.log_prior: torch.Tensor
        self.register_buffer("log_prior", torch.tensor(prior).log().view(1, -1, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        inner = self.generator
        logits: torch.Tensor = inner.logits(a, b) if isinstance(inner, LossGenerator) else inner(a, b)
        return logits + self.log_prior.to(logits.dtype)


def _batch_norms_to_group_norms(module: torch.nn.Module, groups: int = 8) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features))
        else:
            _batch_norms_to_group_norms(child, groups)


def build_fusion_network(ablation: str) -> torch.nn.Module:
    """ReFusion, or ablation V's weighted sum."""
    return WeightedSumFusion() if ablation == "V" else ReFusion()


_LOGIT_GENERATORS: dict[str, Callable[[], torch.nn.Module]] = {
    "global": lambda: GlobalWeights(2),
    "unet": UnetLossGenerator,
    "per_pixel+unet": PerPixelPlusUnetGenerator,
}
"""The ``--generator`` values whose network returns logits, which the loss turns into weights by a softmax."""
GENERATORS: tuple[str, ...] = ("per_pixel", *_LOGIT_GENERATORS)
"""Every ``--generator`` value: the paper's network (``per_pixel``, which returns weights) first."""


def build_loss(args: argparse.Namespace) -> LearnableLoss:
    """The learnable fusion loss for the chosen form, alpha, generator and ablation.

    ``--generator global`` replaces the paper's per-pixel generator with one learned weight per
    source (``metaloss.GlobalWeights``): the baseline that tells whether a per-pixel loss learned
    more than a global preference. ``unet`` and ``per_pixel+unet`` are generators that see shapes
    (``UnetLossGenerator``, ``PerPixelPlusUnetGenerator``). ``--loss-from`` loads a trained run's
    learned loss into it (``metaloss.checkpoint.load_module_state``).
    """
    alpha = 0.0 if args.ablation == "II" else args.alpha
    if args.ablation in ("I", "V"):
        fixed = getattr(args, "fixed_weights", None) if args.ablation == "I" else None
        return tdfusion_loss(ConstantWeights(2, weights=fixed), form=args.form, alpha=alpha)
    generator: torch.nn.Module
    weights: Literal["softmax", "given"]
    if args.generator in _LOGIT_GENERATORS:
        generator, weights = _LOGIT_GENERATORS[args.generator](), "softmax"
    else:
        generator, weights = LossGenerator(), "given"
    prior = getattr(args, "prior_weights", None)
    if prior is not None:
        generator, weights = LogitPrior(generator, tuple(prior)), "softmax"
    loss = tdfusion_loss(generator, form=args.form, alpha=alpha, weights=weights)
    loss_from = getattr(args, "loss_from", None)
    if loss_from is not None:  # a trained run's learned loss (--loss-from)
        name = f"a {args.generator} loss generator" + (" with --prior-weights" if prior is not None else "")
        load_module_state(loss, loss_from, "loss", name)
    return loss


def load_fusion_network(path: str | os.PathLike[str]) -> torch.nn.Module:
    """ReFusion, or ablation V's weighted sum, whichever the checkpoint at ``path`` holds."""
    try:
        return load_released_weights(ReFusion(), path)
    except ValueError as refusion_error:
        try:
            return load_released_weights(WeightedSumFusion(), path)
        except ValueError:
            raise refusion_error from None  # name the network the user most likely meant
