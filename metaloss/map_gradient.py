"""What the meta-gradient says of the weight map, and the parts of it a generator can be spared.

The meta-gradient reaches the loss generator through the weight map ``w`` it outputs: first
``dL_outer/dw`` (one value per source and pixel), then the chain rule into the generator. Before
that chain rule, ``MetaStep(map_gradient=...)`` can remove a part of ``dL_outer/dw`` that says
nothing about *where* one source should win:

- ``"centred"``: its spatial mean per sample and source;
- ``"shift_removed"``: its component along ``shift_direction``, what a uniform shift of the
  model's output would make of it. One virtual step of the model moves its output at every pixel
  in much the same way (its biases and low-frequency features are shared), so the exact map
  gradient is, to first order, ``kappa * shift_direction`` with one number ``kappa`` per sample:
  "make the output brighter" or "darker", spread over the pixels in proportion to how much the
  loss there pulls toward one source. For an intensity term ``sum_k w_k (F - I_k)^2`` the shift
  direction is ``2 (F - I_k)``, so on ``w_a - w_b`` it is the sources' difference ``I_b - I_a``.

References:
    Bai et al., "Task-driven Image Fusion with Learnable Fusion Loss", CVPR 2025 (the map
    gradient of eq. 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from metaloss.learnable_loss import LearnableLoss

__all__ = ["MAP_GRADIENTS", "MapGradient", "remove_component", "shift_direction"]

MapGradient = Literal["full", "centred", "shift_removed"]
MAP_GRADIENTS: tuple[MapGradient, ...] = ("full", "centred", "shift_removed")
"""The ``map_gradient`` options of ``MetaStep`` and ``MetaTrainerConfig``."""


def shift_direction(loss: LearnableLoss, prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``d/dw sum_p dL/dF(p)``: how the weight map would be asked to change if the model's next
    step shifted its whole output uniformly.

    Args:
        loss: the learnable loss (only its ``combine`` is used; the generator is not run).
        prediction: the model's output ``F`` on the batch the loss is taken on.
        sources: the source images, as ``loss.combine`` takes them.
        weights: the weight map ``w`` at which to take it, shaped like ``loss.weights(sources)``.

    Returns:
        A tensor shaped like ``weights`` (detached).

    Examples:
        For a weighted squared error it is ``2 (F - I_k) / n`` per source ``k``:

        >>> import torch
        >>> from metaloss import ConstantWeights, LearnableLoss
        >>> loss = LearnableLoss(ConstantWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> a, b, f = torch.full((1, 1, 2, 2), 0.8), torch.full((1, 1, 2, 2), 0.2), torch.full((1, 1, 2, 2), 0.5)
        >>> u = shift_direction(loss, f, [a, b], loss.weights([a, b]))
        >>> u[0, :, 0, 0] * 8  # 2 (F - I_k) times the mean's 1/8
        tensor([-0.6000,  0.6000])
    """
    w = weights.detach().float().requires_grad_(True)
    f = prediction.detach().float().requires_grad_(True)
    with torch.enable_grad():
        total = loss.combine(f, [s.float() for s in sources], w).total
        (d_output,) = torch.autograd.grad(total, f, create_graph=True)
        (direction,) = torch.autograd.grad(d_output.sum(), w, allow_unused=True)
    return (torch.zeros_like(w) if direction is None else direction).detach().to(weights.dtype)


def remove_component(gradient: Tensor, direction: Tensor) -> Tensor:
    """``gradient`` minus, per sample, its projection on ``direction`` (over every other axis).

    A sample whose ``direction`` is zero keeps its gradient.

    Examples:
        >>> import torch
        >>> g, u = torch.tensor([[3.0, 1.0], [2.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> remove_component(g, u)  # the first sample loses its part along u, the second keeps all
        tensor([[0., 1.],
                [2., 2.]])
    """
    dims = tuple(range(1, gradient.ndim))
    dot = (gradient * direction).sum(dims, keepdim=True)
    norm = (direction * direction).sum(dims, keepdim=True)
    return gradient - torch.where(norm > 0, dot / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0) * direction
