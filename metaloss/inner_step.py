"""The stateless, differentiable inner step.

A virtual step never touches the user's module: parameters are taken as detached leaves, the
module is run through ``torch.func.functional_call``, and the update is a differentiable,
out-of-place copy of one step of the user's real optimiser.

A virtual step must be the step the real optimiser would take, or the meta-gradient describes
another training run. So the inner rules read, for each parameter, *its own* param group
(learning rate, momentum, dampening, Nesterov, betas, eps, weight decay, decoupled decay,
``maximize``, AMSGrad) and its state (momentum buffer; Adam's moments and step count), leave a
parameter that does not train (``requires_grad=False``, or not held by the optimiser) where it
is, and follow the update formulas of ``torch.optim.SGD`` and ``torch.optim.Adam`` / ``AdamW``
as documented (tested equal to one real ``optimizer.step()`` in float64 over a grid of options).
They are written here in plain tensor algebra rather than with torchopt's functional optimisers
because those keep SGD's first-step flag in a closure (a real momentum buffer cannot seed them),
have no AMSGrad and take one set of hyperparameters per transform.

References:
    Finn et al., "Model-Agnostic Meta-Learning", ICML 2017 (the virtual step).
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; Loshchilov and
    Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (AdamW).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from metaloss.activation_checkpointing import CHECKPOINTING_FLAGS, internal_checkpointing

__all__ = [
    "BufferPolicy",
    "InnerAdam",
    "InnerRule",
    "InnerSGD",
    "InnerUpdate",
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

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> view = StatelessModule(net, BufferPolicy.DISCARD)  # or "frozen"
        >>> _ = view(view.snapshot(), torch.rand(2, 1, 5, 5))
        >>> int(net[1].num_batches_tracked)  # the real running statistics did not move
        0
    """

    DISCARD = "discard"
    FROZEN = "frozen"


class StatelessModule:
    """A functional view of a module: call it with a tuple of parameters.

    The module's parameter order is fixed at construction (``named_parameters()`` order). Its
    buffers are read at call time, so the view always follows the real module's state.

    Args:
        module: the user's module; never modified.
        buffer_policy: see ``BufferPolicy``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 1)
        >>> view = StatelessModule(net)
        >>> params = view.snapshot()  # detached leaves that require grad
        >>> shifted = tuple(p + 1.0 for p in params)  # any differentiable function of them
        >>> out = view(shifted, torch.zeros(1, 3))  # the module run with the shifted parameters
        >>> torch.allclose(out, net.bias + 1.0)
        True
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
        """Run the module with ``params`` in place of its parameters.

        Raises:
            ValueError: a graph is recorded and a submodule has activation checkpointing on by
                a library's flag (``metaloss.activation_checkpointing.internal_checkpointing``):
                its recomputation would use the module's own parameters, not ``params``.
        """
        if torch.is_grad_enabled() and (found := internal_checkpointing(self.module)):
            name = type(self.module).__name__
            raise ValueError(
                f"{name} has activation checkpointing on in {found[0] or 'itself'!r}"
                f"{f' and {len(found) - 1} more submodules' if len(found) > 1 else ''} (one of "
                f"{', '.join(CHECKPOINTING_FLAGS)}): its recomputation in the backward pass would run with "
                f"{name}'s own parameters, not the virtual ones a meta step runs it with, and give a wrong "
                "meta-gradient. Turn it off (transformers: model.activation_checkpointing_disable(), formerly "
                "gradient_checkpointing_disable(); timm: model.set_grad_checkpointing(False)); to save memory use "
                "MetaStep(activation_checkpointing=True), or metaloss.checkpointed_call inside your model's forward"
            )
        state: dict[str, Tensor] = dict(zip(self.names, params, strict=True))
        for name, buf in self.module.named_buffers():
            state[name] = buf.clone() if self.buffer_policy is BufferPolicy.DISCARD else buf
        with self._norm_mode():
            return functional_call(self.module, state, args, tie_weights=True, strict=False)


InnerUpdate = Callable[[Params, Params], Params]
"""``update(theta, grads) -> theta'``: one differentiable virtual step. It carries its rule's state
(momentum buffers, Adam's moments) from one call to the next, so calling it k times unrolls k
steps of the real optimiser."""


class InnerRule(Protocol):
    """An inner update rule: starts a run of differentiable virtual steps.

    Examples:
        A rule of your own: SGD with the step size clipped per parameter.

        >>> import torch
        >>> class ClippedSGD:
        ...     def __init__(self, lr, max_step):
        ...         self.lr, self.max_step = lr, max_step
        ...     def start(self, params, real_params, optimizer):
        ...         def update(theta, grads):
        ...             steps = [(self.lr * g).clamp(-self.max_step, self.max_step) for g in grads]
        ...             return tuple(x - s for x, s in zip(theta, steps))
        ...         return update
        >>> update = ClippedSGD(0.1, 0.05).start((torch.zeros(2),), [], None)
        >>> update((torch.zeros(2),), (torch.tensor([1.0, 0.1]),))
        (tensor([-0.0500, -0.0100]),)
    """

    def start(
        self, params: Params, real_params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> InnerUpdate:
        """The update function of a run of virtual steps that starts at ``params``.

        Args:
            params: the parameters the run starts from (leaves of the virtual step's graph).
            real_params: the module's real parameters, in the same order (read for
                ``requires_grad`` and to find their param group and optimiser state).
            optimizer: the module's real optimiser (read only; ``None``: the rule's own settings).
        """
        ...


_SUPPORTED = {
    "SGD": {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"},
    "Adam": {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"},
}
# Entries that do not change a step's arithmetic: implementation choices, and the bookkeeping of
# torch.optim.lr_scheduler (a step uses the group's current lr and momentum, which they set).
_IMPLEMENTATION = {
    "params",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "initial_lr",
    "max_lr",
    "min_lr",
    "max_momentum",
    "base_momentum",
}


def _groups_of(
    real_params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None, family: str | None
) -> list[dict[str, Any] | None]:
    """Each parameter's param group (``None``: the parameter does not train; ``{}``: no optimiser),
    checked against the options of ``family`` that the rule reproduces (``None``: not checked)."""
    group_of: dict[int, dict[str, Any]] = {}
    if optimizer is not None:
        for i, group in enumerate(optimizer.param_groups):
            # Text entries are labels ("name": "encoder"), not options.
            options = {k for k, v in group.items() if not isinstance(v, str)}
            unknown = sorted(options - _SUPPORTED[family] - _IMPLEMENTATION) if family else []
            if unknown:
                raise ValueError(
                    f"the virtual {family} step cannot reproduce {type(optimizer).__name__} option(s) {unknown} "
                    f"(param group {i}); a virtual step must equal the real one, so leave them at their defaults "
                    "or pass the inner rule an optimiser without them"
                )
            for p in group["params"]:
                group_of[id(p)] = group
    out: list[dict[str, Any] | None] = []
    for p in real_params:
        if not p.requires_grad or (optimizer is not None and id(p) not in group_of):
            out.append(None)
        else:
            out.append(group_of.get(id(p), {}))
    return out


def _lr(own: float | None, group: dict[str, Any], who: str) -> float:
    if own is not None:
        return float(own)
    if "lr" not in group:
        raise ValueError(f"{who}(lr=None) follows the real optimiser's learning rate, but none was given")
    return float(group["lr"])


class _OneStep:
    """``step``, a single virtual step, for rules that define ``start``."""

    def start(
        self, params: Params, real_params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> InnerUpdate:
        raise NotImplementedError

    def step(
        self,
        params: Params,
        grads: Params,
        real_params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
    ) -> Params:
        """One virtual step: ``start(params, real_params, optimizer)(params, grads)``."""
        return self.start(params, real_params, optimizer)(params, grads)


@dataclass(frozen=True)
class InnerSGD(_OneStep):
    """A virtual step of SGD, ``theta' = theta - lr * g`` (the paper's eq. 4).

    With a real ``torch.optim.SGD`` the step is that optimiser's, option for option and param
    group by group: momentum (seeded from its momentum buffers), dampening, Nesterov, weight
    decay and ``maximize``. With any other optimiser (a real Adam, as in the released TDFusion
    code) it is a plain SGD step at each param group's learning rate. A parameter with
    ``requires_grad=False``, or one the optimiser does not hold, stays where it is.

    Args:
        lr: step size for every parameter; ``None`` follows each param group's learning rate.

    Examples:
        The virtual step is the step the real optimiser would take (here SGD with momentum):

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> grads = tuple(torch.ones_like(p) for p in net.parameters())
        >>> virtual = InnerSGD().step(tuple(p.detach() for p in net.parameters()), grads, list(net.parameters()), opt)
        >>> for p, g in zip(net.parameters(), grads):
        ...     p.grad = g
        >>> opt.step()
        >>> all(torch.allclose(v, p) for v, p in zip(virtual, net.parameters()))
        True
    """

    lr: float | None = None

    def start(
        self, params: Params, real_params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> InnerUpdate:
        sgd = isinstance(optimizer, torch.optim.SGD)
        groups = _groups_of(real_params, optimizer, "SGD" if sgd else None)
        if not sgd:  # plain SGD at each group's lr: another optimiser's options are not SGD's
            groups = [None if g is None else {k: v for k, v in g.items() if k == "lr"} for g in groups]
        settings = [None if g is None else {**g, "lr": _lr(self.lr, g, "InnerSGD")} for g in groups]
        buffers: list[Tensor | None] = []
        for p, g, leaf in zip(real_params, settings, params, strict=True):
            state = optimizer.state.get(p, {}) if sgd and optimizer is not None else {}
            buf = state.get("momentum_buffer")
            buffers.append(None if g is None or buf is None else buf.detach().to(leaf.dtype))

        def update(theta: Params, grads: Params) -> Params:
            out = []
            for i, (x, d, s) in enumerate(zip(theta, grads, settings, strict=True)):
                if s is None:
                    out.append(x)
                    continue
                if s.get("maximize", False):
                    d = -d
                if s.get("weight_decay", 0):
                    d = d + s["weight_decay"] * x
                momentum = s.get("momentum", 0)
                if momentum:
                    prev = buffers[i]
                    buf = d if prev is None else momentum * prev + (1 - s.get("dampening", 0)) * d
                    buffers[i] = buf
                    d = d + momentum * buf if s.get("nesterov", False) else buf
                out.append(x - s["lr"] * d)
            return tuple(out)

        return update


@dataclass(frozen=True)
class InnerAdam(_OneStep):
    """A virtual step of the real ``torch.optim.Adam`` or ``AdamW``, seeded from its state.

    From a fresh state Adam's first step is about ``lr * sign(g)`` and its derivative with respect
    to ``g`` vanishes, so the step starts from the real optimiser's ``exp_avg``, ``exp_avg_sq``
    (and ``max_exp_avg_sq`` with AMSGrad) and ``step``, per parameter and with each param group's
    betas, eps, weight decay (L2, or decoupled for AdamW), ``maximize`` and ``amsgrad``.
    ``eps_root > 0`` is added under the square root so that it is differentiable at 0.

    Args:
        lr: step size for every parameter; ``None`` follows each param group's.
        betas: ``None`` follows each param group's.
        eps: ``None`` follows each param group's.
        eps_root: added under the square root (must be > 0).

    Examples:
        In a meta step whose model trains with Adam (``MetaStep(..., inner=InnerAdam())``), or
        directly: three virtual steps, unrolled, from the real optimiser's state.

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        >>> theta = tuple(p.detach().requires_grad_() for p in net.parameters())
        >>> update = InnerAdam().start(theta, list(net.parameters()), opt)
        >>> x = theta
        >>> for _ in range(3):
        ...     loss = sum((p**2).sum() for p in x)
        ...     x = update(x, torch.autograd.grad(loss, x, create_graph=True))
        >>> sum(p.sum() for p in x).backward()  # d(after three steps) / d(start): theta[0].grad
        >>> theta[0].grad.shape
        torch.Size([1, 2])
    """

    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    eps_root: float = 1e-16

    def start(
        self, params: Params, real_params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> InnerUpdate:
        if self.eps_root <= 0:
            raise ValueError("InnerAdam needs eps_root > 0: with 0 the meta-gradient is NaN at zero moments")
        if optimizer is None or not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            got = "none" if optimizer is None else type(optimizer).__name__
            raise ValueError(
                "InnerAdam is seeded from the real torch.optim.Adam or AdamW of the module it steps: model_optimizer "
                f"for inner=, task_optimizer for task_inner= (got {got}); use InnerSGD with another optimiser"
            )
        groups = _groups_of(real_params, optimizer, "Adam")
        settings: list[dict[str, Any] | None] = []
        moments: list[list[Tensor] | None] = []
        for p, g, leaf in zip(real_params, groups, params, strict=True):
            if g is None:
                settings.append(None)
                moments.append(None)
                continue
            betas = self.betas or tuple(float(b) for b in g["betas"])
            decoupled = bool(g.get("decoupled_weight_decay", False)) or isinstance(optimizer, torch.optim.AdamW)
            st = optimizer.state.get(p, {})
            zero = torch.zeros_like(leaf)
            m = st["exp_avg"].detach().to(leaf.dtype) if "exp_avg" in st else zero
            v = st["exp_avg_sq"].detach().to(leaf.dtype) if "exp_avg_sq" in st else zero
            vmax = st["max_exp_avg_sq"].detach().to(leaf.dtype) if "max_exp_avg_sq" in st else zero
            settings.append(
                {
                    "lr": _lr(self.lr, g, "InnerAdam"),
                    "betas": betas,
                    "eps": float(g["eps"] if self.eps is None else self.eps),
                    "weight_decay": float(g["weight_decay"]),
                    "decoupled": decoupled,
                    "maximize": bool(g["maximize"]),
                    "amsgrad": bool(g["amsgrad"]),
                    "step": float(st["step"]) if "step" in st else 0.0,
                }
            )
            moments.append([m, v, vmax])

        def update(theta: Params, grads: Params) -> Params:
            out = []
            for i, (x, d, s) in enumerate(zip(theta, grads, settings, strict=True)):
                state = moments[i]
                if s is None or state is None:
                    out.append(x)
                    continue
                if s["maximize"]:
                    d = -d
                lr, wd = s["lr"], s["weight_decay"]
                if wd and s["decoupled"]:
                    x = x * (1 - lr * wd)
                elif wd:
                    d = d + wd * x
                b1, b2 = s["betas"]
                s["step"] += 1
                m = b1 * state[0] + (1 - b1) * d
                v = b2 * state[1] + (1 - b2) * d * d
                state[0], state[1] = m, v
                if s["amsgrad"]:
                    state[2] = torch.maximum(state[2], v)
                    v = state[2]
                bias1, bias2 = 1 - b1 ** s["step"], 1 - b2 ** s["step"]
                out.append(x - (lr / bias1) * m / (torch.sqrt(v / bias2 + self.eps_root) + s["eps"]))
            return tuple(out)

        return update
