"""Fusion loss terms of TDFusion, in the paper's form (default) and the released code's form.

``L_f = L_int + alpha * L_grad`` (Bai et al., CVPR 2025, eq. 1-3), for K >= 2 sources:

| term | paper (``form="paper"``) | released code (``form="released"``) |
|---|---|---|
| intensity | ``mean_px sum_k w_k (F - I_k)^2`` | ``sum_k mean_px (w_k (I_k - F))^2`` |
| gradient | ``mean_px | |grad F| - max_k |grad I_k| |`` | ``sum_d mean_px |S_d*F - T_d|`` |

``|grad I| = |S_x*I| + |S_y*I|``; ``T_d`` is, per direction d in {x, y}, the source's signed
``S_d*I`` of largest magnitude.
``S_x``, ``S_y`` are 3x3 Sobel kernels with zero padding. Each term has a functional form and a
module form usable as a ``metaloss.LossTerm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.learnable_loss import LearnableLoss

__all__ = ["GradientTerm", "IntensityTerm", "LossForm", "gradient_loss", "intensity_loss", "sobel", "tdfusion_loss"]

LossForm = Literal["paper", "released"]

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(image: Tensor) -> tuple[Tensor, Tensor]:
    """Signed Sobel responses ``(S_x * image, S_y * image)`` per channel, zero padding.

    Args:
        image: ``(B, C, H, W)``.

    Examples:
        >>> import torch
        >>> step = torch.zeros(1, 1, 3, 4)
        >>> step[..., 2:] = 1.0  # a vertical edge
        >>> gx, gy = sobel(step)
        >>> gx[0, 0, 1], gy[0, 0, 1]  # the edge, and the zero padding's edge at the right border
        (tensor([ 0.,  4.,  4., -4.]), tensor([0., 0., 0., 0.]))
    """
    c = image.shape[1]
    kx = _SOBEL_X.to(image.device, image.dtype).expand(c, 1, 3, 3)
    ky = _SOBEL_X.t().to(image.device, image.dtype).expand(c, 1, 3, 3)
    return F.conv2d(image, kx, padding=1, groups=c), F.conv2d(image, ky, padding=1, groups=c)


def _check_form(form: str) -> None:
    if form not in ("paper", "released"):
        raise ValueError(f"form must be 'paper' or 'released', got {form!r}")


def intensity_loss(fused: Tensor, sources: Sequence[Tensor], weights: Tensor, form: LossForm = "paper") -> Tensor:
    """The weighted intensity term.

    Args:
        fused: ``(B, 1, H, W)``.
        sources: K tensors ``(B, 1, H, W)``.
        weights: ``(B, K, H, W)``.
        form: ``"paper"`` (eq. 2) or ``"released"`` (squared weights).

    Examples:
        >>> import torch
        >>> ir, vis = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
        >>> weights = torch.cat([torch.full((1, 1, 4, 4), 0.75), torch.full((1, 1, 4, 4), 0.25)], dim=1)
        >>> intensity_loss(torch.full((1, 1, 4, 4), 0.75), [ir, vis], weights)  # the weighted mean is the minimum
        tensor(0.1875)
    """
    _check_form(form)
    stacked = torch.cat(list(sources), dim=1)  # (B, K, H, W)
    squared_error = (fused - stacked) ** 2
    if form == "paper":
        return (weights * squared_error).sum(dim=1).mean()
    return (weights**2 * squared_error).mean(dim=(0, 2, 3)).sum()


def gradient_loss(fused: Tensor, sources: Sequence[Tensor], form: LossForm = "paper") -> Tensor:
    """The Sobel gradient term (the sources' strongest gradient is the target).

    Args:
        fused: ``(B, 1, H, W)``.
        sources: K tensors ``(B, 1, H, W)``.
        form: ``"paper"`` (eq. 3, gradient magnitudes) or ``"released"`` (signed, per direction).

    Examples:
        >>> import torch
        >>> a, b = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
        >>> round(float(gradient_loss(a, [a, a])), 6)  # zero when F has the sources' strongest gradient
        0.0
        >>> float(gradient_loss(a, [a, b])) > 0
        True
    """
    _check_form(form)
    fx, fy = sobel(fused)
    gx, gy = sobel(torch.cat(list(sources), dim=1))  # (B, K, H, W) each
    if form == "paper":
        target = (gx.abs() + gy.abs()).amax(dim=1, keepdim=True)
        return (fx.abs() + fy.abs() - target).abs().mean()
    total = fused.new_zeros(())
    for f_d, g_d in ((fx, gx), (fy, gy)):
        # The source component of largest magnitude, sign kept (ties go to the first source).
        pick = g_d.abs().argmax(dim=1, keepdim=True)
        total = total + (f_d - g_d.gather(1, pick)).abs().mean()
    return total


class IntensityTerm(nn.Module):
    """Module form of ``intensity_loss`` (a ``metaloss.LossTerm``).

    Examples:
        >>> import torch
        >>> from metaloss import ConstantWeights, LearnableLoss
        >>> terms = {"intensity": IntensityTerm(), "gradient": GradientTerm()}
        >>> loss = LearnableLoss(ConstantWeights(2), terms, {"gradient": 0.1})
        >>> out = loss([torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)], torch.full((1, 1, 8, 8), 0.5))
        >>> sorted(out.terms), round(float(out.terms["intensity"]), 4)
        (['gradient', 'intensity'], 0.25)
    """

    def __init__(self, form: LossForm = "paper") -> None:
        super().__init__()
        _check_form(form)
        self.form = form

    def forward(self, prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
        return intensity_loss(prediction, sources, weights, self.form)


class GradientTerm(nn.Module):
    """Module form of ``gradient_loss`` (a ``metaloss.LossTerm``; ignores the weights).

    Examples:
        >>> import torch
        >>> term = GradientTerm(form="released")  # the released code's form; "paper" is the default
        >>> a = torch.rand(1, 1, 8, 8)
        >>> round(float(term(a, [a, torch.zeros_like(a)], torch.full((1, 2, 8, 8), 0.5))), 6)  # the weights are ignored
        0.0
    """

    def __init__(self, form: LossForm = "paper") -> None:
        super().__init__()
        _check_form(form)
        self.form = form

    def forward(self, prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
        return gradient_loss(prediction, sources, self.form)


def tdfusion_loss(
    generator: nn.Module,
    *,
    form: LossForm = "paper",
    alpha: float = 1.0,
    weights: Literal["softmax", "given"] = "given",
) -> LearnableLoss:
    """TDFusion's learnable fusion loss ``L_int + alpha * L_grad`` around ``generator``.

    Args:
        generator: e.g. ``LossGenerator`` (ends in a Softmax: ``"given"``).
        form: ``"paper"`` or ``"released"`` for both terms.
        alpha: the gradient term's coefficient (0 drops it: ablation II).
        weights: how the generator's output becomes weights (see ``metaloss.LearnableLoss``).

    Examples:
        >>> import torch
        >>> from metaloss.fusion import LossGenerator
        >>> loss = tdfusion_loss(LossGenerator(), alpha=0.1)
        >>> ir, vis = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
        >>> out = loss([ir, vis], torch.rand(1, 1, 32, 32, requires_grad=True))
        >>> sorted(out.terms), tuple(out.weights.shape)
        (['gradient', 'intensity'], (1, 2, 32, 32))
        >>> tdfusion_loss(LossGenerator(), alpha=0).terms.keys()  # ablation II: no gradient term
        dict_keys(['intensity'])
    """
    terms: dict[str, nn.Module] = {"intensity": IntensityTerm(form)}
    if alpha:
        terms["gradient"] = GradientTerm(form)
    return LearnableLoss(generator, terms, {"gradient": alpha} if alpha else None, weights=weights)
