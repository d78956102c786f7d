"""Hypergradients through inner steps: exact (second order), implicit and finite-difference.

Notation: ``theta`` are the model's parameters, ``phi`` the loss generator's, ``L_in(theta, phi)``
the learnable (inner) loss, ``U`` the inner update (``theta' = U(theta, g)``, ``g = dL_in/dtheta``)
and ``L_out(theta')`` the outer (task) loss. The hypergradient is

    dL_out/dphi = (dg/dphi)^T  J_U(g)^T  dL_out/dtheta'.

*Exact* builds the graph of ``g`` (``create_graph=True``) and back-propagates through it.
*Exact through a Jacobian-vector product* (``hypergradient_jvp``, one step): where the inner
loss is a learnable loss of the model's output, ``L_in = l(model(theta), phi)``, the term
``(dg/dphi)^T w`` (``w`` as below) is ``d/dphi (dl/dy . J w)``, with ``J w`` one forward-mode
product of the model; nothing of the model is differentiated twice.

*Finite difference* never builds a second-order graph: with ``w = J_U(g)^T v`` (a cheap
vector-Jacobian product through the element-wise update, ``-lr * v`` for SGD) and
``(dg/dphi)^T w = d/dphi (dL_in/dtheta . w)``, the directional derivative is replaced by a
central difference,

    (dg/dphi)^T w  ~=  [dL_in/dphi(theta + e w) - dL_in/dphi(theta - e w)] / (2 e),

with ``e`` chosen so that ``||e w|| = fd_eps * max(||theta||, 1)``.

*Implicit* differentiation treats the parameters reached after the inner steps (taken without a
graph) as a stationary point of the inner loss, ``g(theta*, phi) = 0``, so that by the implicit
function theorem

    dL_out/dphi = -(dg/dphi)^T  H^{-1}  dL_out/dtheta*,     H = dg/dtheta (the inner Hessian),

and solves ``(H + ridge I) x = dL_out/dtheta*`` by conjugate gradients on Hessian-vector products
(torchopt's ``solve_cg``). Its memory does not grow with the number of inner steps, so it suits
long inner horizons; it is exact only at a stationary point (and CG assumes ``H + ridge I``
positive definite: add ``ridge`` for a non-convex inner loss).

*Several inner steps* (``steps = k``, exact mode) unroll ``theta_{i+1} = U(theta_i, g_i)``
k times on the same inner loss and back-propagate through all of them (Finn et al. 2017). The
graph of every step stays alive until the outer backward, so time and activation memory grow
about linearly with k.

Each hypergradient labels its stages for ``torch.profiler`` (``HYPERGRADIENT_STAGES``:
``record_function`` ranges, which cost nothing measurable when no profiler runs), so a profile or
a trace of a meta step shows where its time goes (``MetaStep`` adds its own two,
``meta_step.META_STEP_STAGES``; ``python benchmarks/meta_iteration.py --stages 3`` prints them).

References:
    Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019, eq. (7)-(8).
    Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019.
    Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as forward_ad
import torchopt
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

__all__ = [
    "HYPERGRADIENT_STAGES",
    "HypergradientMode",
    "HypergradientResult",
    "NonFiniteHypergradientError",
    "hypergradient",
    "hypergradient_jvp",
]

Params = tuple[Tensor, ...]
HypergradientMode = Literal["exact", "finite_difference", "implicit"]

HYPERGRADIENT_STAGES = {
    "metaloss.inner_loss": "the inner loss at theta: the model's forward and the learnable loss",
    "metaloss.inner_gradient": "g = dL_in/dtheta (a backward through the model) and the update to theta'",
    "metaloss.outer_loss": "L_out(theta'): the updated model and the task model, forward",
    "metaloss.outer_gradient": "dL_out/dtheta' (a backward through both) and its pull-back through the update",
    "metaloss.second_order": "the outer gradient carried into the generator (jvp: a forward-mode product "
    "and a double backward of the loss; exact: a backward through g's graph; finite difference: two "
    "perturbed inner losses; implicit: conjugate gradients)",
    "metaloss.forward_product": "the forward-mode product J w of the model (jvp; inside second_order)",
}
"""The ``torch.profiler`` ranges a hypergradient records, by name, with what each holds."""


class NonFiniteHypergradientError(FloatingPointError):
    """Raised when a hypergradient holds NaN or Inf and the policy is ``"raise"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaStep
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> fusion, task = nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(1, 1, 1)
        >>> meta = MetaStep(fusion, loss, task, lambda out, batch: out.mean() * float("nan"),
        ...                 outer_optimizer=torch.optim.Adam(loss.parameters()),
        ...                 model_optimizer=torch.optim.SGD(fusion.parameters(), lr=0.1),
        ...                 task_optimizer=torch.optim.SGD(task.parameters(), lr=0.1), nonfinite="raise")
        >>> batch = {"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}
        >>> try:
        ...     meta.step(batch, batch)
        ... except NonFiniteHypergradientError:
        ...     print("skipped: the meta-gradient is not finite")
        skipped: the meta-gradient is not finite
    """


@dataclass(frozen=True)
class HypergradientResult:
    """The hypergradient and the losses seen while computing it.

    Attributes:
        grads: one tensor per ``wrt`` entry (zeros where the loss does not depend on it).
        inner_loss: ``L_in(theta)``, detached.
        outer_loss: ``L_out(theta')``, detached.

    Examples:
        >>> import torch
        >>> lam = torch.zeros(1, requires_grad=True)
        >>> result = hypergradient(lambda t: ((t[0] - lam) ** 2).sum(), lambda t, g: (t[0] - 0.25 * g[0],),
        ...                        lambda t: (t[0] ** 2).sum(), (torch.ones(1, requires_grad=True),), [lam])
        >>> float(result.inner_loss), float(result.outer_loss), result.norm(), result.is_finite()
        (1.0, 0.25, 0.5, True)
    """

    grads: tuple[Tensor, ...]
    inner_loss: Tensor
    outer_loss: Tensor

    def norm(self) -> float:
        """The global L2 norm of ``grads`` (``nan`` if any entry is not finite)."""
        if not self.grads:
            return 0.0
        if not self.is_finite():
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in self.grads])))

    def is_finite(self) -> bool:
        """Whether every entry of ``grads`` is finite."""
        return all_finite(self.grads)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _grad(
    output: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False, retain_graph: bool | None = None
) -> Params:
    grads = torch.autograd.grad(output, inputs, allow_unused=True, create_graph=create_graph, retain_graph=retain_graph)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True))


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def hypergradient(
    inner_loss: Callable[[Params], Tensor],
    update: Callable[[Params, Params], Params],
    outer_loss: Callable[[Params], Tensor],
    params: Params,
    wrt: Sequence[Tensor],
    *,
    mode: HypergradientMode = "exact",
    fd_eps: float = 1e-4,
    steps: int = 1,
    cg_iterations: int = 20,
    ridge: float = 0.0,
) -> HypergradientResult:
    """Differentiate ``outer_loss(update(params, grad inner_loss(params)))`` with respect to ``wrt``.

    Only ``wrt`` receives gradients; no ``.grad`` attribute anywhere is written.

    Args:
        inner_loss: ``theta -> L_in`` with a graph to ``wrt``.
        update: the differentiable inner update ``(theta, g) -> theta'`` (called ``steps`` times;
            it may carry state, such as momentum, from one call to the next).
        outer_loss: ``theta' -> L_out``.
        params: ``theta`` as leaves that require grad.
        wrt: the loss generator's parameters.
        mode: ``"exact"``, ``"finite_difference"`` or ``"implicit"``.
        fd_eps: relative size of the finite-difference perturbation.
        steps: inner steps to differentiate through (exact), or to take before the implicit
            gradient (implicit); ``"finite_difference"`` takes one.
        cg_iterations: conjugate-gradient iterations of the implicit mode.
        ridge: added to the inner Hessian's diagonal in the implicit mode.

    Returns:
        The hypergradient with the inner and outer loss values (the inner loss of the first step).

    Examples:
        ``L_in = (theta - lam)^2``, one SGD step of size 1/4, ``L_out = theta'^2``: from
        ``theta = 1, lam = 0``, ``theta' = 1/2`` and ``dL_out/dlam = 2 theta' * 2 * 1/4 = 1/2``.

        >>> import torch
        >>> lam = torch.zeros(1, requires_grad=True)
        >>> theta = (torch.ones(1, requires_grad=True),)
        >>> inner = lambda t: ((t[0] - lam) ** 2).sum()
        >>> sgd = lambda t, g: (t[0] - 0.25 * g[0],)
        >>> outer = lambda t: (t[0] ** 2).sum()
        >>> hypergradient(inner, sgd, outer, theta, [lam]).grads
        (tensor([0.5000]),)
        >>> round(float(hypergradient(inner, sgd, outer, theta, [lam], mode="finite_difference").grads[0]), 4)
        0.5
        >>> hypergradient(inner, sgd, outer, theta, [lam], steps=2).grads  # two unrolled steps
        (tensor([0.3750]),)
    """
    wrt = tuple(wrt)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mode == "exact":
        losses, new_params = [], params
        for _ in range(steps):
            with record_function("metaloss.inner_loss"):
                losses.append(inner_loss(new_params))
            with record_function("metaloss.inner_gradient"):
                new_params = update(new_params, _grad(losses[-1], new_params, create_graph=True))
        l_in = losses[0]
        with record_function("metaloss.outer_loss"):
            l_out = outer_loss(new_params)
        with record_function("metaloss.second_order"):  # dL_out/dtheta' and on through g's graph
            grads = _grad(l_out, wrt)
        return HypergradientResult(grads, l_in.detach(), l_out.detach())
    if mode == "implicit":
        return _implicit(inner_loss, update, outer_loss, params, wrt, steps, cg_iterations, ridge)
    if mode != "finite_difference":
        raise ValueError(f"mode must be 'exact', 'finite_difference' or 'implicit', got {mode!r}")
    if steps != 1:
        raise ValueError(f"mode='finite_difference' differentiates through one inner step; use 'exact' for {steps}")
    if fd_eps <= 0:
        raise ValueError(f"fd_eps must be > 0, got {fd_eps}")

    with record_function("metaloss.inner_loss"):
        l_in_graph = inner_loss(params)
    l_in = l_in_graph.detach()
    # retain_graph: the weight map's graph to ``wrt`` is shared with the two perturbed losses.
    l_out, w = _update_direction(l_in_graph, params, update, outer_loss, retain_graph=True)
    del l_in_graph
    w_norm = _global_norm(w)
    if not bool(w_norm > 0):
        grads = (
            tuple(torch.zeros_like(x) for x in wrt)
            if bool(torch.isfinite(w_norm))
            else tuple(torch.full_like(x, float("nan")) for x in wrt)
        )
        return HypergradientResult(grads, l_in.detach(), l_out.detach())
    scale = fd_eps * torch.clamp(_global_norm([p.detach() for p in params]), min=1.0)
    e = scale / w_norm
    with torch.no_grad():
        plus = tuple(p.detach() + e * d for p, d in zip(params, w, strict=True))
        minus = tuple(p.detach() - e * d for p, d in zip(params, w, strict=True))
    with record_function("metaloss.second_order"):
        difference = (inner_loss(plus) - inner_loss(minus)) / (2 * e)
        grads = _grad(difference, wrt)
    return HypergradientResult(grads, l_in.detach(), l_out.detach())


def _update_direction(
    l_in: Tensor,
    params: Params,
    update: Callable[[Params, Params], Params],
    outer_loss: Callable[[Params], Tensor],
    retain_graph: bool,
) -> tuple[Tensor, Params]:
    """First-order part of one step: ``L_out(theta')`` and ``w = J_U(g)^T dL_out/dtheta'``.

    ``retain_graph``: keep ``l_in``'s whole graph (with the model's activations) through the
    outer pass. Without it, the graph to ``wrt`` (which ``g`` does not pass through) still
    survives, so a loss built again from the same weight map reaches ``wrt``.
    """
    with record_function("metaloss.inner_gradient"):
        g = tuple(x.detach().requires_grad_(True) for x in _grad(l_in, params, retain_graph=retain_graph))
        with torch.enable_grad():
            new_params = update(tuple(p.detach() for p in params), g)
    theta_new = tuple(p.detach().requires_grad_(True) for p in new_params)
    with record_function("metaloss.outer_loss"):
        l_out = outer_loss(theta_new)
    with record_function("metaloss.outer_gradient"):
        v = _grad(l_out, theta_new)
        return l_out.detach(), _grad(_dot(new_params, v), g)


def hypergradient_jvp(
    model: Callable[[Params], Tensor],
    output_loss: Callable[[Tensor], Tensor],
    update: Callable[[Params, Params], Params],
    outer_loss: Callable[[Params], Tensor],
    params: Params,
    wrt: Sequence[Tensor],
    *,
    product: Callable[[Params, Params], Tensor] | None = None,
) -> HypergradientResult:
    """The exact one-step hypergradient, with a forward-mode product of the model in place of
    the double backward.

    For an inner loss ``L_in(theta) = output_loss(model(theta))`` in which only ``output_loss``
    depends on ``wrt`` (a learnable loss applied to a model's output), ``g = J^T e`` with ``J``
    the model's Jacobian and ``e = d output_loss/dy`` at ``y = model(theta)``, so

        (dg/dphi)^T w = d/dphi (e . J w),

    where ``u = J w`` is one Jacobian-vector product of the model (forward-mode automatic
    differentiation, ``torch.autograd.forward_ad``, no graph kept) and ``d/dphi (e . u)`` a
    double backward of ``output_loss`` alone. The result equals ``hypergradient(...,
    mode="exact")`` up to rounding; the model's activations are never kept for a second-order
    backward (measured on ReFusion + SegFormer-b0, batch 2 x 256^2: a peak RSS of 5.90 against
    10.72 GiB). The model runs twice at ``params`` (the first-order gradient, then the
    product), with the same random draws.

    Args:
        model: ``theta -> y``, independent of ``wrt``; every operation in it needs a forward-mode
            derivative (PyTorch's operators have them; a custom ``autograd.Function`` needs a
            ``jvp``).
        output_loss: ``y -> L_in``, with a graph to ``wrt``.
        update: the differentiable inner update ``(theta, g) -> theta'`` (one step).
        outer_loss: ``theta' -> L_out``.
        params: ``theta`` as leaves that require grad.
        wrt: the loss generator's parameters (or any tensors ``output_loss`` depends on).
        product: ``(theta, w) -> J w`` in place of ``forward_product(model, theta, w)``
            (``MetaStep(second_order="compiled_jvp")`` passes a compiled ``forward_product``);
            it runs under the same replayed random draws and ``torch.no_grad``, and must use
            them as ``model`` does.

    Returns:
        The hypergradient with the inner and outer loss values.

    Examples:
        A model ``y = 2 theta`` under ``L_in = (y - lam)^2``, one SGD step of size 1/16 from
        ``theta = 1, lam = 0``: ``g = 4 (2 theta - lam) = 8``, ``theta' = 1/2``,
        ``dtheta'/dlam = 4/16`` and ``dL_out/dlam = 2 theta' * 1/4 = 1/4`` for ``L_out = theta'^2``.

        >>> import torch
        >>> lam = torch.zeros(1, requires_grad=True)
        >>> theta = (torch.ones(1, requires_grad=True),)
        >>> args = (lambda t: 2 * t[0], lambda y: ((y - lam) ** 2).sum(), lambda t, g: (t[0] - g[0] / 16,),
        ...         lambda t: (t[0] ** 2).sum(), theta, [lam])
        >>> hypergradient_jvp(*args).grads
        (tensor([0.2500]),)

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994 (the
        forward-mode product).
    """
    wrt = tuple(wrt)
    draws = _RandomDraws(params)
    with record_function("metaloss.inner_loss"):
        y = model(params)
        l_in_graph = output_loss(y)
    l_in, y = l_in_graph.detach(), y.detach()
    l_out, w = _update_direction(l_in_graph, params, update, outer_loss, retain_graph=False)
    del l_in_graph
    jacobian_times = product if product is not None else functools.partial(forward_product, model)
    with record_function("metaloss.second_order"):
        u = _jacobian_times(jacobian_times, params, w, draws)
        y.requires_grad_(True)
        (e,) = torch.autograd.grad(output_loss(y), y, create_graph=True)
        grads = _grad((e * u.to(e.dtype)).sum(), wrt)
    return HypergradientResult(grads, l_in, l_out)


def _jacobian_times(
    jacobian_times: Callable[[Params, Params], Tensor], params: Params, w: Params, draws: _RandomDraws
) -> Tensor:
    """``jacobian_times(theta, w)`` under the first evaluation's random draws, without a graph."""
    try:  # fused attention kernels have no forward-mode derivative; the composite one has
        with record_function("metaloss.forward_product"), draws.replayed(), torch.no_grad():
            with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
                # PyTorch scripts its jvp decompositions on first use
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
                return jacobian_times(tuple(p.detach() for p in params), w)
    except (NotImplementedError, RuntimeError) as error:
        if "forward" not in str(error).lower() and "jvp" not in str(error).lower():
            raise
        raise NotImplementedError(
            f"the model has an operation without a forward-mode derivative ({error}); use the double "
            "backward instead: MetaStep(second_order='double_backward'), or hypergradient(mode='exact')"
        ) from error


def forward_product(model: Callable[[Params], Tensor], params: Params, tangents: Params) -> Tensor:
    """``J w``: the change of ``model``'s output along ``tangents`` at ``params``, by one
    evaluation of ``model`` on dual tensors (``torch.autograd.forward_ad``).

    Examples:
        >>> import torch
        >>> forward_product(lambda t: t[0] ** 2, (torch.tensor([3.0]),), (torch.tensor([1.0]),))
        tensor([6.])
    """
    with forward_ad.dual_level():
        duals = tuple(forward_ad.make_dual(p, d) for p, d in zip(params, tangents, strict=True))
        out = forward_ad.unpack_dual(model(duals))
        return torch.zeros_like(out.primal) if out.tangent is None else out.tangent


class _RandomDraws:
    """Replays the random draws (dropout) of a model evaluated twice at the same parameters."""

    def __init__(self, tensors: Params) -> None:
        self.cuda = sorted(
            {torch.cuda.current_device() if t.device.index is None else t.device.index for t in tensors if t.is_cuda}
        )
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(i) for i in self.cuda]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from the saved random state; the state after it is as before it."""
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(self.cpu_state)
            for i, state in zip(self.cuda, self.cuda_states, strict=True):
                torch.cuda.set_rng_state(state, i)
            yield


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def _implicit(
    inner_loss: Callable[[Params], Tensor],
    update: Callable[[Params, Params], Params],
    outer_loss: Callable[[Params], Tensor],
    params: Params,
    wrt: tuple[Tensor, ...],
    steps: int,
    cg_iterations: int,
    ridge: float,
) -> HypergradientResult:
    """The implicit-function-theorem hypergradient at the parameters reached after ``steps``."""
    if cg_iterations < 1 or ridge < 0:
        raise ValueError(f"implicit mode needs cg_iterations >= 1 and ridge >= 0, got {cg_iterations}, {ridge}")
    theta = params
    l_in = None
    for _ in range(steps):
        with record_function("metaloss.inner_loss"):
            loss = inner_loss(theta)
        l_in = loss.detach() if l_in is None else l_in
        with record_function("metaloss.inner_gradient"):
            grads = _grad(loss, theta)
            with torch.no_grad():
                theta = tuple(t.detach() for t in update(tuple(x.detach() for x in theta), grads))
        theta = tuple(t.requires_grad_(True) for t in theta)
    with record_function("metaloss.outer_loss"):
        l_out = outer_loss(theta)
    with record_function("metaloss.outer_gradient"):
        v = _grad(l_out, theta)
    with record_function("metaloss.second_order"):  # the inner Hessian's solve, then into wrt
        g = _grad(inner_loss(theta), theta, create_graph=True)  # its graph reaches wrt through the loss

        def hessian_vector(x: Params) -> Params:
            return _grad(_dot(g, x), theta, retain_graph=True)

        solve = torchopt.linear_solve.solve_cg(ridge=ridge or None, maxiter=cg_iterations)
        x = tuple(t.detach() for t in solve(hessian_vector, v))
        grads = tuple(-d for d in _grad(_dot(g, x), wrt))
    assert l_in is not None
    return HypergradientResult(grads, l_in, l_out.detach())
