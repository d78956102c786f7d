"""One meta step, callable from the user's own training loop.

The three lines of TDFusion's Algorithm 1 (Bai et al., CVPR 2025, eq. 4-6):

1. a virtual step of the task model on the meta-train batch: ``T' = T - eta_T dL_t/dT``;
2. a differentiable virtual step of the model under the learnable loss:
   ``F' = F - eta_F dL_f(w = G(sources))/dF``;
3. the task loss of ``T'(F'(meta-test batch))``, differentiated with respect to ``G`` only.

With ``virtual_step="output"`` step 2 moves ``F``'s output on the meta-train batch instead of
its parameters, and step 3 judges that output (see ``MetaStep``).

The user's modules are never modified (parameters or buffers); only the loss generator's
parameters receive a gradient, and only the outer optimiser given here steps them.

Under DistributedDataParallel the virtual steps run on the wrapped modules' ``.module`` (DDP's
hooks must not fire on a ``create_graph=True`` backward) and the generator's meta-gradient is
averaged over the ranks explicitly before it is stepped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from metaloss.batch import BatchAdapter, SourcesAdapter
from metaloss.distributed import all_reduce_mean, rank_and_world_size, unwrap
from metaloss.grouped_conv import FastGroupedConv
from metaloss.hypergradient import (
    HYPERGRADIENT_STAGES,
    HypergradientMode,
    HypergradientResult,
    NonFiniteHypergradientError,
    all_finite,
    forward_product,
    hypergradient,
    hypergradient_jvp,
)
from metaloss.inner_step import BufferPolicy, InnerRule, InnerSGD, StatelessModule
from metaloss.learnable_loss import LearnableLoss, check_sources, weight_statistics
from metaloss.map_gradient import MAP_GRADIENTS, MapGradient, remove_component, shift_direction

__all__ = [
    "META_STEP_STAGES",
    "SECOND_ORDERS",
    "VIRTUAL_STEPS",
    "MetaStep",
    "MetaStepStats",
    "SecondOrder",
    "TaskLoss",
    "VirtualStep",
    "checked_task_loss",
]

VirtualStep = Literal["model", "output"]
"""What ``MetaStep``'s virtual step moves: the model's parameters (the paper) or its output."""
VIRTUAL_STEPS: tuple[VirtualStep, ...] = ("model", "output")
"""The ``virtual_step`` options of ``MetaStep`` and ``MetaTrainerConfig``."""

SecondOrder = Literal["jvp", "compiled_jvp", "double_backward"]
"""How the exact mode differentiates the model's virtual step: a forward-mode product of the model
(``hypergradient_jvp``), the same product compiled by ``torch.compile``, or a backward through its
backward."""
SECOND_ORDERS: tuple[SecondOrder, ...] = ("jvp", "compiled_jvp", "double_backward")
"""The ``second_order`` options of ``MetaStep`` and ``MetaTrainerConfig``."""

META_STEP_STAGES = {
    "metaloss.task_virtual_step": "T' from an ordinary step of the task model on the model's output (eq. 5)",
    "metaloss.loss_weights": "the loss generator's weight maps of the meta-train sources",
    **HYPERGRADIENT_STAGES,
}
"""The ``torch.profiler`` ranges of a ``MetaStep.hypergradient``, by name, with what each holds:
its own two and the hypergradient's (``hypergradient.HYPERGRADIENT_STAGES``)."""

TaskLoss = Callable[[Any, Any], Tensor]
"""``task_loss(task_output, batch) -> scalar tensor``: the task model's output and the whole
batch, for instance ``lambda logits, batch: F.cross_entropy(logits, batch["mask"])``, or a
detection loss that reads its targets from the batch (any callable; no base class)."""


def checked_task_loss(task_loss: TaskLoss, output: Any, batch: Any) -> Tensor:
    """Call ``task_loss`` and check that it returned a scalar tensor (cast to float32).

    Examples:
        >>> import torch
        >>> checked_task_loss(lambda out, batch: out.mean(), torch.ones(2, 3), None)
        tensor(1.)
        >>> checked_task_loss(lambda out, batch: out, torch.ones(2, 3), None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...scalar...
    """
    value = task_loss(output, batch)
    if not isinstance(value, Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"task_loss must return a scalar tensor, got {shape}; reduce it (e.g. .mean())")
    return value if value.dtype == torch.float64 else value.float()


@dataclass(frozen=True)
class MetaStepStats:
    """What one meta step measured.

    Attributes:
        inner_loss: the learnable loss of the model on the meta-train batch.
        task_inner_loss: the task loss on the meta-train batch (before ``T``'s virtual step; on
            ``F'``'s images with ``task_adaptation="virtual_model"``).
        outer_loss: the task loss of ``T'(F'(meta-test batch))``.
        hypergrad_norm: the L2 norm of the loss generator's meta-gradient.
        weight_mean: the mean weight of each source on the meta-train batch.
        weight_std: its standard deviation.
        terms: each term of the learnable loss on the meta-train batch.
        skipped: the meta-gradient was not finite and the generator was not stepped.
        skipped_total: skipped steps so far.
        weights: the weight map on the meta-train batch ``(B, K, ...)``, detached (only with
            ``MetaStep(weight_map_grad=True)``; not logged).
        weight_map_grad: the outer loss's gradient with respect to that weight map: where the
            task asks the loss to move its weights (the descent direction is its negative; only
            with ``weight_map_grad=True``; not logged).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> fusion, task = nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(1, 1, 1)
        >>> meta = MetaStep(fusion, loss, task, lambda out, batch: out.mean(),
        ...                 outer_optimizer=torch.optim.Adam(loss.parameters()),
        ...                 model_optimizer=torch.optim.SGD(fusion.parameters(), lr=0.1),
        ...                 task_optimizer=torch.optim.SGD(task.parameters(), lr=0.1), weight_map_grad=True)
        >>> batch = {"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}
        >>> stats = meta.step(batch, batch)
        >>> stats.weight_mean, stats.skipped, stats.weight_map_grad.shape
        ((0.5, 0.5), False, torch.Size([2, 2, 8, 8]))
    """

    inner_loss: float
    task_inner_loss: float
    outer_loss: float
    hypergrad_norm: float
    weight_mean: tuple[float, ...]
    weight_std: tuple[float, ...]
    terms: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    skipped_total: int = 0
    weights: Tensor | None = None
    weight_map_grad: Tensor | None = None


@dataclass
class _InnerProblem:
    """What ``hypergradient`` differentiates for one meta step: the inner loss
    ``output_loss(model(params))`` and update of ``params`` and the outer loss, with the sources
    and weight map the inner loss uses."""

    sources: Sequence[Tensor]
    weights: Tensor
    params: tuple[Tensor, ...]
    model: Callable[[tuple[Tensor, ...]], Tensor]
    output_loss: Callable[[Tensor], Tensor]
    update: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]
    outer_loss: Callable[[tuple[Tensor, ...]], Tensor]
    task_inner_loss: Tensor | None
    seen: dict[str, Any]
    product: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], Tensor] | None = None

    def inner_loss(self, theta: tuple[Tensor, ...]) -> Tensor:
        return self.output_loss(self.model(theta))


class MetaStep:
    """The embeddable meta step: compute the loss generator's meta-gradient and step it.

    Args:
        model: the model ``F`` trained under the learnable loss.
        loss: the ``LearnableLoss`` whose parameters are meta-learned.
        task_model: the task model ``T`` that judges ``F``'s predictions (one without
            parameters, such as ``nn.Identity()``, makes the task loss a fixed metric).
        task_loss: ``task_loss(task_model_output, batch) -> scalar``.
        outer_optimizer: steps ``loss``'s parameters (``None``: ``step`` only writes
            ``.grad`` of those parameters and leaves the stepping to you).
        model_optimizer: ``F``'s real optimiser (read for ``lr=None`` and to seed
            ``InnerAdam``; never stepped here).
        task_optimizer: ``T``'s real optimiser (read only, likewise).
        adapter: reads the user's batches (default ``SourcesAdapter``).
        inner: the model's differentiable inner update (default SGD at ``F``'s learning rate).
        task_inner: the task model's inner update (default SGD at ``T``'s learning rate).
        mode: ``"exact"`` (second order), ``"finite_difference"`` (first-order memory) or
            ``"implicit"`` (implicit differentiation at the parameters reached after
            ``inner_steps`` steps, by conjugate gradients; memory independent of the horizon).
        fd_eps: relative perturbation of the finite-difference mode.
        buffer_policy: what BatchNorm buffers do in the virtual steps (``BufferPolicy``).
        nonfinite: ``"skip"`` a non-finite meta-gradient (counted) or ``"raise"``
            ``NonFiniteHypergradientError``.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16``, ``torch.float16``); losses stay in float32.
        activation_checkpointing: recompute the activations of the model and of the loss
            generator in the backward passes instead of keeping them (non-reentrant
            ``torch.utils.checkpoint``, which supports the second-order backward). Measured on
            ReFusion + SegFormer-b0, batch 2 x 256^2, exact mode through the jvp: peak RSS 5.90
            -> 4.11 GiB, meta iteration 2.49x -> 2.94x a plain one (``docs/benchmarks.md``). With
            ``second_order="double_backward"`` the second-order graph keeps ``F``'s recomputed
            activations (at 2 x 128^2, before ``G`` was checkpointed too: 4.04 GiB both ways).
            Checkpointing each block inside the networks instead keeps less for less time
            (``metaloss.checkpointed_call``; ``ReFusion(checkpoint_blocks=True)`` and
            ``LossGenerator(checkpoint_blocks=True)``: 2.74 against 4.07 GiB, 1.25x against
            1.28x the default's meta iteration, same size and machine, docs/benchmarks.md).
        average_over_ranks: all-reduce the meta-gradient to its mean over the ranks of the
            default process group before stepping (``None``: whenever ``torch.distributed`` is
            initialised with more than one rank). Every rank must then call ``step``
            together; the statistics it returns stay those of the rank's own batches.
        weight_map_grad: also return the outer loss's gradient with respect to the weight map
            (``MetaStepStats.weight_map_grad``; a diagnostic, at no extra backward pass).
        inner_steps: virtual steps of the model on the meta-train batch before the meta-test
            (k = 1 is the paper's); more are differentiated by unrolling (``mode="exact"``,
            about k times the time and activation memory of one) or implicitly
            (``mode="implicit"``); the inner rule's state (momentum, Adam's moments) carries from
            step to step.
        cg_iterations: conjugate-gradient iterations of the implicit mode.
        ridge: added to the inner Hessian's diagonal in the implicit mode (needed when the inner
            loss is not convex at the point reached).
        map_gradient: ``"full"`` (the exact meta-gradient) or ``"centred"``: the outer loss's
            gradient with respect to the weight map has its spatial mean per image and source
            removed before it is carried back into the generator, so the generator learns where
            one source should win *relative to the rest of the image*, not a global preference
            for one source (which, measured on the TDFusion demo, dominates the exact
            meta-gradient and follows the current task model's biases). Costs no further pass of
            the generator: the changed gradient goes back through the graph of its one forward,
            which the meta-gradient's backward stops short of. ``"shift_removed"``: per sample, the part of
            that gradient that a uniform shift of the model's output would cause is projected
            out (``shift_direction``): for the intensity term of a fusion loss it is the map
            gradient's component along the sources' difference, which asks only for a brighter
            or a darker output everywhere (measured on the TDFusion demo with task networks of
            known skill, ``benchmarks/meta_gradient_direction.py``). It costs a double backward
            of the loss alone.
        map_gradient_weights: ``batch -> weights``, broadcastable to the weight map
            ``(B, K, *spatial)`` of the meta-train batch: the map gradient (after
            ``map_gradient``) is multiplied by them before it is carried back into the
            generator. For instance class-balancing weights from the batch's labels, so that a
            rare region's requests count per pixel as much as a common one's (measured on the
            TDFusion demo, ``docs/learned-loss-study.md``). ``None``: unweighted. Like
            ``map_gradient="centred"``, it costs no further pass of the generator.
        task_adaptation: where ``T``'s virtual step learns from. ``"current_model"`` (the
            paper, eq. 5): ``T' = T - eta dL_t(T(F(meta-train)))/dT``, fixed before ``F``'s
            virtual step, so the meta-gradient asks only how ``F'`` suits the *current* task
            model. ``"virtual_model"``: ``T'`` takes its step on ``F'(meta-train)``, and that step
            is differentiated too, so the meta-gradient also asks how the loss changes what ``T``
            *learns* from ``F``'s images (the paper's downstream protocol trains a fresh task
            network on them). Costs one more forward of ``F'`` and a double backward through
            ``T``. ``task_inner`` sets that step's size.
        virtual_step: what the virtual step moves. ``"model"`` (the paper, eq. 4): ``F``'s
            parameters, judged on the meta-test batch. ``"output"``: ``F``'s output itself on the
            meta-train batch's task view, each element its own parameter,
            ``F' = F(x) - output_lr * n * dL_f/dF(x)`` (``n`` the output's number of elements, so
            that ``output_lr`` is a step per element of a mean-reduced loss: 1/2 moves a squared
            error's output to its weighted target), judged by ``T'`` on the same batch (the
            meta-test batch is not used). It is the paper's meta-gradient for a model whose
            parameters act on one pixel each: the weight at a pixel learns from what the task
            model wants *there*, without the coupling through ``F``'s shared parameters that
            makes the ``"model"`` meta-gradient mostly one brighter-or-darker preference per
            image (measured on the TDFusion demo, ``benchmarks/meta_gradient_direction.py``).
            No backward through ``F``: cheaper than ``"model"``. The loss is taken on the task
            view, so the adapter's ``task_sources(batch)`` (``SourcesAdapter`` has it; others
            fall back to ``sources``) must give sources the shape of that view.
        output_lr: the per-element step size of ``virtual_step="output"``.
        second_order: how ``mode="exact"`` differentiates one virtual step of ``F``'s parameters.
            ``"jvp"``: through one forward-mode product of ``F`` and a double backward of the
            learnable loss alone (``hypergradient_jvp``; ``F``'s activations are never kept for
            a second-order backward: measured on ReFusion + SegFormer-b0, batch 2 x 256^2 on a
            2-core CPU, a peak RSS of 5.90 against 10.72 GiB and 2.49x against 2.88x a plain
            iteration's time, ``docs/benchmarks.md``). ``"compiled_jvp"``: the same product
            compiled by ``torch.compile`` (inductor), which fuses the tangent's element-wise
            terms into fewer passes over ``F``'s activations: measured there, a meta iteration
            2.49-2.53x a plain one against 2.67-2.74x with ``"jvp"`` (SegFormer-b0; YOLOv8-n
            2.56-2.57x against 2.75-2.79x; before the training attention's channel-major copies,
            which took 9-14% off both). It compiles on the first meta step and again for
            each new batch shape (30-40 s for ReFusion on that CPU); inductor's
            ``fallback_random`` keeps the eager call's dropout draws. ``"double_backward"``:
            back-propagates through ``F``'s backward; for a model with an operation that has no
            forward-mode derivative. All three are equal up to rounding. Several inner steps are
            always unrolled by double backward.

    Examples:
        Source ``a`` holds a square that the task model must find; ``b`` is noise. One meta
        step moves the generator (here one global logit per source) and nothing else:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> fusion, task = nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        >>> opt_f, opt_t = torch.optim.Adam(fusion.parameters(), 1e-2), torch.optim.Adam(task.parameters(), 1e-2)
        >>> meta = MetaStep(fusion, loss, task, lambda logits, batch: F.cross_entropy(logits, batch["mask"]),
        ...                 outer_optimizer=torch.optim.Adam(loss.parameters(), 1e-2),
        ...                 model_optimizer=opt_f, task_optimizer=opt_t)
        >>> def batch():
        ...     mask = torch.zeros(2, 8, 8, dtype=torch.long)
        ...     mask[:, 2:6, 2:6] = 1
        ...     return {"a": mask[:, None].float(), "b": torch.rand(2, 1, 8, 8), "mask": mask}
        >>> before = [p.clone() for p in fusion.parameters()]
        >>> stats = meta.step(batch(), batch())  # meta-train batch, meta-test batch
        >>> loss.generator.logits.detach().abs().max() > 0  # G moved
        tensor(True)
        >>> all(torch.equal(p, q) for p, q in zip(fusion.parameters(), before))  # F did not
        True

        In your loop, follow ``meta.step`` with your ordinary steps of ``F`` (under
        ``loss(sources, fused, detach_weights=True)``) and of ``T`` (README, tutorial 1). To
        average the meta-gradient over several (meta-train, meta-test) pairs before one outer
        step (a less noisy signal for more time), call ``accumulate`` for each pair, then
        ``apply``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LearnableLoss,
        task_model: nn.Module,
        task_loss: TaskLoss,
        *,
        outer_optimizer: torch.optim.Optimizer | None = None,
        model_optimizer: torch.optim.Optimizer | None = None,
        task_optimizer: torch.optim.Optimizer | None = None,
        adapter: BatchAdapter[Any] | None = None,
        inner: InnerRule | None = None,
        task_inner: InnerRule | None = None,
        mode: HypergradientMode = "exact",
        fd_eps: float = 1e-4,
        buffer_policy: BufferPolicy | str = BufferPolicy.DISCARD,
        nonfinite: Literal["skip", "raise"] = "skip",
        autocast_dtype: torch.dtype | None = None,
        activation_checkpointing: bool = False,
        average_over_ranks: bool | None = None,
        weight_map_grad: bool = False,
        inner_steps: int = 1,
        cg_iterations: int = 20,
        ridge: float = 0.0,
        map_gradient: MapGradient = "full",
        map_gradient_weights: Callable[[Any], Tensor] | None = None,
        task_adaptation: Literal["current_model", "virtual_model"] = "current_model",
        virtual_step: VirtualStep = "model",
        output_lr: float = 0.5,
        second_order: SecondOrder = "jvp",
    ) -> None:
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if mode not in ("exact", "finite_difference", "implicit"):
            raise ValueError(f"mode must be 'exact', 'finite_difference' or 'implicit', got {mode!r}")
        if inner_steps < 1 or (inner_steps > 1 and mode == "finite_difference"):
            raise ValueError(f"inner_steps must be 1, or > 1 with mode 'exact' or 'implicit'; got {inner_steps}")
        self.model = model
        self.loss = loss
        self.task_model = task_model
        self.task_loss = task_loss
        self.outer_optimizer = outer_optimizer
        self.model_optimizer = model_optimizer
        self.task_optimizer = task_optimizer
        self.adapter: BatchAdapter[Any] = adapter or SourcesAdapter()
        self.inner: InnerRule = inner or InnerSGD()
        self.task_inner: InnerRule = task_inner or InnerSGD()
        self.mode: HypergradientMode = mode
        self.fd_eps = fd_eps
        self.nonfinite = nonfinite
        self.autocast_dtype = autocast_dtype
        self.activation_checkpointing = activation_checkpointing
        self.average_over_ranks = average_over_ranks
        if map_gradient not in MAP_GRADIENTS:
            raise ValueError(f"map_gradient must be one of {MAP_GRADIENTS}, got {map_gradient!r}")
        if task_adaptation not in ("current_model", "virtual_model"):
            raise ValueError(f"task_adaptation must be 'current_model' or 'virtual_model', got {task_adaptation!r}")
        self.task_adaptation = task_adaptation
        if virtual_step not in VIRTUAL_STEPS:
            raise ValueError(f"virtual_step must be one of {VIRTUAL_STEPS}, got {virtual_step!r}")
        if virtual_step == "output" and task_adaptation != "current_model":
            raise ValueError(
                "virtual_step='output' takes T's virtual step as the paper does: use task_adaptation='current_model'"
            )
        if not output_lr > 0:
            raise ValueError(f"output_lr must be > 0, got {output_lr}")
        self.virtual_step: VirtualStep = virtual_step
        self.output_lr = output_lr
        if second_order not in SECOND_ORDERS:
            raise ValueError(f"second_order must be one of {SECOND_ORDERS}, got {second_order!r}")
        self.second_order: SecondOrder = second_order
        self.weight_map_grad = weight_map_grad
        self.inner_steps = inner_steps
        self.cg_iterations = cg_iterations
        self.ridge = ridge
        self.map_gradient = map_gradient
        self.map_gradient_weights = map_gradient_weights
        self.skipped_total = 0
        self._pending: list[Tensor] | None = None
        self._pending_count = 0
        self._model_view = StatelessModule(unwrap(model), buffer_policy)
        self._task_view = StatelessModule(unwrap(task_model), buffer_policy)
        self._compiled_product: Callable[..., Tensor] | None = None

    @property
    def _through_jvp(self) -> bool:
        """Whether the exact meta-gradient takes ``hypergradient_jvp`` (one virtual step of ``F``'s
        parameters; the output step has no ``F`` to differentiate)."""
        jvp = self.mode == "exact" and self.second_order in ("jvp", "compiled_jvp")
        return jvp and self.inner_steps == 1 and self.virtual_step == "model"

    @property
    def compiles_product(self) -> bool:
        """Whether the meta step computes ``F``'s forward-mode product compiled
        (``second_order="compiled_jvp"`` where the exact meta-gradient takes the product): the
        first meta step then compiles it."""
        return self._through_jvp and self.second_order == "compiled_jvp"

    def _across_ranks(self) -> bool:
        if self.average_over_ranks is not None:
            return self.average_over_ranks
        return rank_and_world_size()[1] > 1

    @property
    def generator_parameters(self) -> list[nn.Parameter]:
        """The meta-learned parameters (those of ``loss`` that require grad)."""
        return [p for p in self.loss.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        device = next(self.model.parameters()).device
        with torch.autocast(device_type=device.type, dtype=self.autocast_dtype):
            yield

    def _virtual_model(self, theta: tuple[Tensor, ...], *args: Any) -> Any:
        """``F`` with parameters ``theta``, its activations recomputed in backward if asked."""
        if not self.activation_checkpointing:
            return self._model_view(theta, *args)
        return torch.utils.checkpoint.checkpoint(self._model_view, theta, *args, use_reentrant=False)

    def _forward_product(self, theta: tuple[Tensor, ...], tangents: tuple[Tensor, ...], *args: Any) -> Tensor:
        """``J w``: the change of ``F(*args)`` along ``tangents`` at ``theta`` (``forward_product``)."""

        def model(params: tuple[Tensor, ...]) -> Tensor:
            with self._autocast():
                prediction: Tensor = self._model_view(params, *args)
            return prediction

        return forward_product(model, theta, tangents)

    def _compiled_forward_product(self, theta: tuple[Tensor, ...], tangents: tuple[Tensor, ...], *args: Any) -> Tensor:
        """``_forward_product`` compiled once per ``MetaStep`` (``second_order="compiled_jvp"``);
        inductor's ``fallback_random`` keeps the eager dropout draws, which the product replays."""
        if self._compiled_product is None:
            self._compiled_product = torch.compile(self._forward_product, options={"fallback_random": True})
        return self._compiled_product(theta, tangents, *args)

    def _weights(self, sources: Sequence[Tensor]) -> Tensor:
        """The generator's weight map, its activations recomputed in backward if asked."""
        with record_function("metaloss.loss_weights"):
            if not self.activation_checkpointing:
                return self.loss.weights(sources)
            weights: Tensor = torch.utils.checkpoint.checkpoint(self.loss.weights, sources, use_reentrant=False)
            return weights

    def _task_step(self, prediction: Tensor, batch: Any, differentiable: bool) -> tuple[tuple[Tensor, ...], Tensor]:
        """``T'`` from one virtual step of ``T`` on ``prediction`` (``F``'s task view of ``batch``),
        and ``T``'s loss before the step. ``differentiable``: the step stays in the graph, so
        ``T'`` depends on ``prediction``; otherwise ``T'`` is detached."""
        view = self._task_view
        params = view.snapshot()
        with self._autocast():
            output = view(params, *self.adapter.task_args(batch, prediction))
        value = checked_task_loss(self.task_loss, output, batch)
        if not params:  # a task "model" without parameters (a fixed metric) has nothing to step
            return (), value.detach()
        grads = torch.autograd.grad(value, params, allow_unused=True, create_graph=differentiable)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
        new = self.task_inner.start(params, view.parameters, self.task_optimizer)(params, grads)
        return (new if differentiable else tuple(p.detach() for p in new)), value.detach()

    def _task_virtual_step(self, batch: Any) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """Step 1: ``T'`` from one ordinary (non-differentiable) step on ``F(batch)``; also returns
        ``T``'s loss before the step and ``F(batch)`` (the task view, detached)."""
        with record_function("metaloss.task_virtual_step"):
            with torch.no_grad(), self._autocast():
                # Through the stateless view: a plain call in train mode would update F's buffers.
                prediction = self._model_view(self._model_view.snapshot(False), *self.adapter.task_model_args(batch))
            params, value = self._task_step(prediction.detach(), batch, differentiable=False)
        return params, value, prediction.detach()

    def _task_adapted_to(self, theta_new: tuple[Tensor, ...], batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        """``task_adaptation="virtual_model"``: ``T'`` from a differentiable step on ``F'(batch)``,
        so that ``T'`` depends on ``theta_new`` (and through it on the generator)."""
        # T's step is differentiated again: fused attention kernels (flash, memory-efficient)
        # have no double backward, so scaled-dot-product attention takes its composite form.
        with sdpa_kernel(SDPBackend.MATH):
            with self._autocast():
                prediction = self._virtual_model(theta_new, *self.adapter.task_model_args(batch))
            return self._task_step(prediction, batch, differentiable=True)

    def _model_problem(self, train_batch: Any, test_batch: Any) -> _InnerProblem:
        """The paper's problem: a virtual step of ``F``'s parameters on the meta-train batch,
        judged by ``T'`` on the meta-test batch."""
        sources = self.adapter.sources(train_batch)
        check_sources(sources)
        check_sources(self.adapter.sources(test_batch))
        adapt_through_model = self.task_adaptation == "virtual_model"
        # With task_adaptation="virtual_model", T steps on F' inside the outer loss instead.
        task_params, task_inner_loss = ((), None) if adapt_through_model else self._task_virtual_step(train_batch)[:2]
        model_args = self.adapter.model_args(train_batch)
        with self._autocast():
            weights = self._weights(sources)
        seen: dict[str, Any] = {}

        # A double backward of F (the implicit mode; the exact one unless through the jvp): grouped
        # convolutions take the double backward that does not loop over their groups
        # (metaloss.grouped_conv). The jvp needs the native convolution's forward-mode derivative.
        twice = self.mode == "implicit" or (self.mode == "exact" and not self._through_jvp)
        fast_conv = FastGroupedConv if twice else contextlib.nullcontext

        def model(theta: tuple[Tensor, ...]) -> Tensor:
            with self._autocast(), fast_conv():
                prediction: Tensor = self._virtual_model(theta, *model_args)
            if self.map_gradient == "shift_removed":  # its shift direction is taken at theta (the first call)
                seen.setdefault("prediction", prediction.detach())
            return prediction

        def output_loss(prediction: Tensor) -> Tensor:
            out = self.loss.combine(prediction, sources, weights)
            seen.setdefault("terms", out.terms)
            return out.total

        theta = self._model_view.snapshot()

        def outer_loss(theta_new: tuple[Tensor, ...]) -> Tensor:
            judge = task_params
            if adapt_through_model:
                judge, seen["task_inner_loss"] = self._task_adapted_to(theta_new, train_batch)
            with self._autocast():
                prediction = self._virtual_model(theta_new, *self.adapter.task_model_args(test_batch))
                output = self._task_view(judge, *self.adapter.task_args(test_batch, prediction))
            return checked_task_loss(self.task_loss, output, test_batch)

        update = self.inner.start(theta, self._model_view.parameters, self.model_optimizer)
        product = None
        if self.compiles_product:

            def product(theta: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> Tensor:
                return self._compiled_forward_product(theta, tangents, *model_args)

        return _InnerProblem(
            sources, weights, theta, model, output_loss, update, outer_loss, task_inner_loss, seen, product
        )

    def _output_problem(self, train_batch: Any) -> _InnerProblem:
        """``virtual_step="output"``: the virtual step moves ``F``'s output on the meta-train
        batch's task view, pixel by pixel, and ``T'`` judges that output."""
        task_sources = getattr(self.adapter, "task_sources", self.adapter.sources)
        sources = task_sources(train_batch)
        check_sources(sources)
        task_params, task_inner_loss, fused = self._task_virtual_step(train_batch)
        if fused.shape[2:] != sources[0].shape[2:]:
            raise ValueError(
                f"virtual_step='output' takes the loss on the task view: the model's output there is "
                f"{tuple(fused.shape)} but the sources are {tuple(sources[0].shape)}; give the adapter a "
                "task_sources(batch) method (SourcesAdapter has one) that returns the task view's sources"
            )
        with self._autocast():
            weights = self._weights(sources)
        seen: dict[str, Any] = {"prediction": fused}
        # Per element of a mean-reduced loss: output_lr = 1/2 moves a squared-error term's output
        # all the way to its weighted target.
        size = self.output_lr * fused.numel()

        def output_loss(prediction: Tensor) -> Tensor:
            out = self.loss.combine(prediction, sources, weights)
            seen.setdefault("terms", out.terms)
            return out.total

        def update(theta: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return (theta[0] - size * grads[0],)

        def outer_loss(theta_new: tuple[Tensor, ...]) -> Tensor:
            with self._autocast():
                output = self._task_view(task_params, *self.adapter.task_args(train_batch, theta_new[0]))
            return checked_task_loss(self.task_loss, output, train_batch)

        # An autocast (bf16) output is stepped in float32, as the losses are taken.
        theta = (fused.to(torch.promote_types(fused.dtype, torch.float32)).requires_grad_(True),)
        return _InnerProblem(
            sources, weights, theta, lambda t: t[0], output_loss, update, outer_loss, task_inner_loss, seen
        )

    def hypergradient(self, train_batch: Any, test_batch: Any) -> tuple[HypergradientResult, MetaStepStats]:
        """Compute the loss generator's meta-gradient without stepping anything.

        Returns:
            The hypergradient (one tensor per ``generator_parameters`` entry) and the step's
            statistics (``skipped`` is always ``False`` here).
        """
        wrt = self.generator_parameters
        if not wrt:
            raise ValueError("the learnable loss has no trainable parameters: nothing to meta-learn")
        problem = (
            self._output_problem(train_batch)
            if self.virtual_step == "output"
            else self._model_problem(train_batch, test_batch)
        )
        sources, weights, seen = problem.sources, problem.weights, problem.seen
        task_inner_loss = problem.task_inner_loss
        # A map gradient that is changed before it reaches G is taken alone, and then carried into
        # G through the graph to the map, which the first backward stops short of.
        carry_changed = self.map_gradient != "full" or self.map_gradient_weights is not None
        need_map = self.weight_map_grad or carry_changed
        targets = [weights] if carry_changed else [*wrt, weights] if need_map else wrt
        if self._through_jvp:
            result = hypergradient_jvp(
                problem.model,
                problem.output_loss,
                problem.update,
                problem.outer_loss,
                problem.params,
                targets,
                product=problem.product,
            )
        else:
            result = hypergradient(
                problem.inner_loss,
                problem.update,
                problem.outer_loss,
                problem.params,
                targets,
                mode=self.mode,
                fd_eps=self.fd_eps,
                steps=self.inner_steps,
                cg_iterations=self.cg_iterations,
                ridge=self.ridge,
            )
        map_grad = None
        if need_map:
            map_grad = result.grads[-1].detach()
            result = replace(result, grads=result.grads[:-1])
        if carry_changed:
            assert map_grad is not None
            if self.map_gradient == "centred":
                carried = map_grad - map_grad.mean(dim=tuple(range(2, map_grad.ndim)), keepdim=True)
            elif self.map_gradient == "shift_removed":
                carried = remove_component(map_grad, shift_direction(self.loss, seen["prediction"], sources, weights))
            else:
                carried = map_grad
            if self.map_gradient_weights is not None:
                carried = carried * self.map_gradient_weights(train_batch).to(carried)
            grads = torch.autograd.grad(weights, wrt, grad_outputs=carried.to(weights.dtype), allow_unused=True)
            grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, wrt, strict=True))
            result = replace(result, grads=grads)
        weight_mean, weight_std = weight_statistics(weights)
        stats = MetaStepStats(
            inner_loss=float(result.inner_loss),
            task_inner_loss=float(seen["task_inner_loss"] if task_inner_loss is None else task_inner_loss),
            outer_loss=float(result.outer_loss),
            hypergrad_norm=result.norm(),
            weight_mean=weight_mean,
            weight_std=weight_std,
            terms={k: float(v.detach()) for k, v in seen.get("terms", {}).items()},
            skipped_total=self.skipped_total,
            weights=weights.detach() if self.weight_map_grad else None,
            weight_map_grad=map_grad if self.weight_map_grad else None,
        )
        return result, stats

    def accumulate(self, train_batch: Any, test_batch: Any) -> MetaStepStats:
        """Compute the meta-gradient of one pair and add it to the pending sum (no step).

        ``apply`` then steps the generator with the mean of the pending meta-gradients.
        """
        result, stats = self.hypergradient(train_batch, test_batch)
        grads = [g.detach() for g in result.grads]
        if self._pending is None:
            self._pending = grads
        else:
            self._pending = [a + b for a, b in zip(self._pending, grads, strict=True)]
        self._pending_count += 1
        return stats

    def apply(self) -> bool:
        """Step the loss generator with the mean of the accumulated meta-gradients.

        A meta-gradient holding NaN or Inf never reaches the generator: the step is skipped
        and counted (``nonfinite="skip"``) or ``NonFiniteHypergradientError`` is raised.
        Under several ranks the mean is also taken over the ranks (every rank calls this).

        Returns:
            ``True`` if the generator was stepped (or its ``.grad`` written), ``False`` if skipped.

        Raises:
            RuntimeError: nothing was accumulated since the last call.
        """
        if self._pending is None:
            raise RuntimeError("MetaStep.apply() needs at least one accumulate() call before it")
        grads = tuple(g / self._pending_count for g in self._pending)
        self._pending, self._pending_count = None, 0
        if self._across_ranks():  # then every rank reaches the same verdict below
            grads = all_reduce_mean(grads)
        if not all_finite(grads):
            self.skipped_total += 1
            if self.nonfinite == "raise":
                raise NonFiniteHypergradientError(
                    "the loss generator's meta-gradient is not finite; lower the learning rates or use nonfinite='skip'"
                )
            return False
        for p, g in zip(self.generator_parameters, grads, strict=True):
            p.grad = g.to(p.dtype)
        if self.outer_optimizer is not None:
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
        return True

    def step(self, train_batch: Any, test_batch: Any) -> MetaStepStats:
        """Compute the meta-gradient of one pair and step the loss generator with it.

        ``stats.skipped`` says whether the step was skipped for a non-finite meta-gradient.
        """
        return self.step_averaged([(train_batch, test_batch)])

    def step_averaged(self, pairs: Sequence[tuple[Any, Any]]) -> MetaStepStats:
        """One step of the loss generator on the mean meta-gradient of ``pairs``.

        ``accumulate`` for each ``(train_batch, test_batch)`` pair, then ``apply``.

        Returns:
            The statistics of the last pair, with ``skipped`` set for a non-finite mean.
        """
        if not pairs:
            raise ValueError("step_averaged needs at least one (train_batch, test_batch) pair")
        for train_batch, test_batch in pairs:
            stats = self.accumulate(train_batch, test_batch)
        try:
            stepped = self.apply()
        except NonFiniteHypergradientError as err:
            raise NonFiniteHypergradientError(
                f"{err} (outer loss {stats.outer_loss}, inner loss {stats.inner_loss})"
            ) from None
        return replace(stats, skipped=not stepped, skipped_total=self.skipped_total)
