"""The stateless, differentiable inner step.

A virtual step never touches the user's module: parameters are taken as detached leaves, the
module is run through :func:`torch.func.functional_call`, and updates come from torchopt's
functional optimisers with ``inplace=False``.

References:
    Finn et al., "Model-Agnostic Meta-Learning", ICML 2017 (the virtual step).
    Ren et al., "TorchOpt: An Efficient Library for Differentiable Optimization", JMLR 2023.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torchopt
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "BufferPolicy",
    "InnerAdam",
    "InnerRule",
    "InnerSGD",
    "StatelessModule",
]

Params = tuple[Tensor, ...]


class BufferPolicy(enum.StrEnum):
    """What normalisation buffers (BatchNorm running statistics) do during a virtual step.

    Attributes:
        DISCARD: norm layers keep their mode (batch statistics in train mode); running-statistic
            updates land on throw-away copies, so the real buffers never change. The default.
        FROZEN: norm layers run in eval mode for the virtual forwards (running statistics are
            used and nothing is updated); their mode is restored afterwards.
    """

    DISCARD = "discard"
    FROZEN = "frozen"


class StatelessModule:
    """A functional view of a module: call it with a tuple of parameters.

    The module's parameter order is fixed at construction (``named_parameters()`` order). Its
    buffers are read at call time, so the view always follows the real module's state.

    Args:
        module: the user's module; never modified.
        buffer_policy: see :class:`BufferPolicy`.
    """

    def __init__(self, module: nn.Module, buffer_policy: BufferPolicy | str = BufferPolicy.DISCARD) -> None:
        self.module = module
        self.buffer_policy = BufferPolicy(buffer_policy)
        named = list(module.named_parameters())
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.parameters: tuple[nn.Parameter, ...] = tuple(p for _, p in named)

    def snapshot(self, requires_grad: bool = True) -> Params:
        """The current parameters as detached leaves (sharing storage, never written)."""
        return tuple(p.detach().requires_grad_(requires_grad) for p in self.parameters)

    @contextlib.contextmanager
    def _norm_mode(self) -> Iterator[None]:
        if self.buffer_policy is not BufferPolicy.FROZEN:
            yield
            return
        norms = [m for m in self.module.modules() if isinstance(m, _NormBase) and m.training]
        for m in norms:
            m.train(False)
        try:
            yield
        finally:
            for m in norms:
                m.train(True)

    def __call__(self, params: Sequence[Tensor], *args: Any) -> Any:
        """Run the module with ``params`` in place of its parameters."""
        state: dict[str, Tensor] = dict(zip(self.names, params, strict=True))
        for name, buf in self.module.named_buffers():
            state[name] = buf.clone() if self.buffer_policy is BufferPolicy.DISCARD else buf
        with self._norm_mode():
            return functional_call(self.module, state, args, tie_weights=True, strict=False)


class InnerRule(Protocol):
    """An inner update rule: ``params' = rule.step(params, grads)``, differentiable."""

    def step(
        self,
        params: Params,
        grads: Params,
        real_params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
    ) -> Params:
        """Return the updated parameters (no in-place change to any input)."""
        ...


def _resolve_lr(lr: float | None, optimizer: torch.optim.Optimizer | None, who: str) -> float:
    if lr is not None:
        return float(lr)
    if optimizer is None:
        raise ValueError(f"{who}(lr=None) follows the real optimiser's learning rate, but none was given")
    return float(optimizer.param_groups[0]["lr"])


def _apply(transform: torchopt.base.GradientTransformation, state: Any, params: Params, grads: Params) -> Params:
    updates, _ = transform.update(grads, state, params=params, inplace=False)
    return tuple(torchopt.apply_updates(params, updates, inplace=False))


@dataclass(frozen=True)
class InnerSGD:
    """One plain SGD step, ``theta' = theta - lr * g`` (the paper's eq. 4).

    Args:
        lr: step size; ``None`` follows the real optimiser's current learning rate (as the
            released TDFusion code does).
    """

    lr: float | None = None

    def step(
        self,
        params: Params,
        grads: Params,
        real_params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
    ) -> Params:
        transform = torchopt.sgd(_resolve_lr(self.lr, optimizer, "InnerSGD"))
        return _apply(transform, transform.init(params), params, grads)


@dataclass(frozen=True)
class InnerAdam:
    """One Adam step seeded from the real ``torch.optim.Adam``'s moments.

    From a fresh state Adam's first step is about ``lr * sign(g)`` and its derivative with respect
    to ``g`` vanishes, so the step must start from the real optimiser's ``exp_avg``,
    ``exp_avg_sq`` and ``step``. ``eps_root > 0`` keeps ``sqrt`` differentiable at 0.

    Args:
        lr: step size; ``None`` follows the real optimiser.
        betas: ``None`` follows the real optimiser's param group.
        eps: ``None`` follows the real optimiser's param group.
        eps_root: added under the square root (must be > 0).
    """

    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    eps_root: float = 1e-16

    def step(
        self,
        params: Params,
        grads: Params,
        real_params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
    ) -> Params:
        if self.eps_root <= 0:
            raise ValueError("InnerAdam needs eps_root > 0: with 0 the meta-gradient is NaN at zero moments")
        if optimizer is None or not isinstance(optimizer, torch.optim.Adam):
            got = "none" if optimizer is None else type(optimizer).__name__
            raise ValueError(
                "InnerAdam is seeded from the real torch.optim.Adam of the module it steps: model_optimizer for "
                f"inner=, task_optimizer for task_inner= (got {got}); use InnerSGD with another optimiser"
            )
        group = optimizer.param_groups[0]
        betas = self.betas or tuple(group["betas"])
        eps = group["eps"] if self.eps is None else self.eps
        transform = torchopt.adam(
            _resolve_lr(self.lr, optimizer, "InnerAdam"),
            betas=betas,
            eps=eps,
            eps_root=self.eps_root,  # type: ignore[arg-type]
        )
        adam_state, *rest = transform.init(params)
        mu, nu, count = [], [], []
        for p, leaf in zip(real_params, params, strict=True):
            st = optimizer.state.get(p, {})
            if "exp_avg" in st:
                mu.append(st["exp_avg"].detach().to(leaf.dtype))
                nu.append(st["exp_avg_sq"].detach().to(leaf.dtype))
                steps = float(st["step"])
            else:
                mu.append(torch.zeros_like(leaf))
                nu.append(torch.zeros_like(leaf))
                steps = 0.0
            # The count in the parameters' dtype: torchopt's bias correction pow(beta, count)
            # is float32 for an integer count, a 1e-7 error in float64 work.
            count.append(torch.tensor(steps, dtype=leaf.dtype, device=leaf.device))
        seeded = adam_state._replace(mu=tuple(mu), nu=tuple(nu), count=tuple(count))
        return _apply(transform, (seeded, *rest), params, grads)
