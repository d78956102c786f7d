"""Outer update rules for the loss generator.

Meta-gradients are tiny (1e-6 to 1e-4 with a 1e-4 inner step), so the rule matters. The
released TDFusion code steps ``theta_G -= lr * g / max|g|`` with the maximum taken over all of
the generator's parameters together (and no step when that maximum is 0):
``MaxNormalizedSGD``. Adam (the paper's text) and plain SGD are the alternatives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

__all__ = ["MaxNormalizedSGD", "OuterRule", "make_outer_optimizer"]

OuterRule = Literal["adam", "sgd", "max_normalized"]


class MaxNormalizedSGD(torch.optim.Optimizer):
    """SGD whose step is scaled by the largest absolute gradient entry of all parameters.

    ``p -= lr * p.grad / max_{all params, all entries} |grad|``; no step when that is 0.

    Args:
        params: the parameters (or param groups; the maximum is taken over all groups).
        lr: the step size, i.e. the largest change of any single entry.

    Examples:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> opt = MaxNormalizedSGD([p], lr=0.1)
        >>> p.grad = torch.tensor([1e-6, -4e-6, 2e-6])  # meta-gradients are tiny
        >>> opt.step()
        >>> p.data
        tensor([-0.0250,  0.1000, -0.0500])
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], lr: float = 1e-4) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        """Take one step (``closure`` re-evaluates the loss, as in ``torch.optim``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        largest = torch.stack([g.abs().max() for g in grads]).max()
        if not bool(largest > 0):
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / largest, alpha=-group["lr"])
        return loss


def make_outer_optimizer(rule: OuterRule, params: Iterable[nn.Parameter], lr: float = 1e-4) -> torch.optim.Optimizer:
    """Build the loss generator's optimiser by name.

    Args:
        rule: ``"adam"`` (the paper), ``"sgd"``, or ``"max_normalized"`` (the released code).
        params: the generator's parameters.
        lr: learning rate.

    Examples:
        >>> from metaloss import GlobalWeights
        >>> make_outer_optimizer("max_normalized", GlobalWeights(2).parameters(), lr=3e-3)
        MaxNormalizedSGD (
        Parameter Group 0
            lr: 0.003
        )
    """
    params = list(params)
    if rule == "adam":
        return torch.optim.Adam(params, lr=lr)
    if rule == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if rule == "max_normalized":
        return MaxNormalizedSGD(params, lr=lr)
    raise ValueError(f"outer rule must be 'adam', 'sgd' or 'max_normalized', got {rule!r}")
