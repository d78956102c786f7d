"""``MetaTrainer``: TDFusion's Algorithm 1 as a ready schedule.

Per epoch (Bai et al., CVPR 2025, Algorithm 1 and section 3.3):

1. draw fresh, non-overlapping meta-train and meta-test subsets from the training set;
2. M meta iterations: one ``MetaStep`` each (virtual steps of the model and the
   task model on a meta-train batch, outer step of the loss generator on a meta-test batch);
3. N ordinary iterations over the training set: the model learns from the learnable loss with
   its weights detached, the task model from the task loss on the detached predictions.

Every sample order comes from a generator seeded by ``(seed, epoch)``, so a run resumed from a
checkpoint (which holds the modules, every optimiser, the RNG states and the position in the
schedule) reproduces the uninterrupted run. With ``num_workers=0`` this is bit-identical on CPU;
with workers, random transforms inside the data set draw from per-worker seeds that depend on
where the loader was started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from metaloss.batch import BatchAdapter, SourcesAdapter, move_to_device
from metaloss.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from metaloss.distributed import all_gather_objects, rank_and_world_size, unwrap
from metaloss.hypergradient import HypergradientMode
from metaloss.inner_step import BufferPolicy, InnerRule, StatelessModule
from metaloss.learnable_loss import LearnableLoss, check_sources, weight_statistics
from metaloss.map_gradient import MapGradient
from metaloss.meta_step import MetaStep, SecondOrder, TaskLoss, VirtualStep, checked_task_loss
from metaloss.outer import OuterRule, make_outer_optimizer

__all__ = ["MetaTrainer", "MetaTrainerConfig", "ModelStepStats", "Position"]


@dataclass
class MetaTrainerConfig:
    """The schedule and its options (the paper's defaults where it gives them).

    Attributes:
        epochs: L (paper: 50).
        meta_iterations: M, meta iterations (outer steps of the loss generator) per epoch
            (paper: 200).
        meta_accumulation: (meta-train, meta-test) pairs whose meta-gradients are averaged into
            each outer step (paper: 1); more gives a less noisy step for proportionally more time.
        warmup_epochs: the first epochs run no meta phase, only ordinary iterations, so that the
            task model's judgement means something when the loss generator starts learning
            (paper: 0).
        frozen_loss_epochs: the last epochs run no meta phase either: the loss generator keeps
            the loss it has learned and the model and task model go on training under it
            (paper: 0). The meta phase runs in epochs ``warmup_epochs`` to
            ``epochs - frozen_loss_epochs - 1``.
        model_iterations: N, ordinary iterations per epoch; ``None`` is one pass over the data.
        batch_size: samples per batch (paper: 2).
        lr: learning rate of the default Adam optimisers of the model and the task model.
        outer_rule: the loss generator's update rule when no outer optimiser is given.
        outer_lr: its learning rate.
        mode: hypergradient mode (``"exact"``, ``"finite_difference"`` or ``"implicit"``).
        fd_eps: relative perturbation of the finite-difference mode.
        buffer_policy: BatchNorm buffers in virtual steps.
        nonfinite: ``"skip"`` or ``"raise"`` on a non-finite meta-gradient.
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` to run forwards under autocast.
        activation_checkpointing: recompute the model's activations in the meta step's
            backward passes (less memory in ``"finite_difference"`` mode; see
            ``MetaStep``).
        joint_task_weight: also train the model on ``weight * task loss`` in its ordinary
            step (ablation III of the paper); 0 disables it.
        model_phase: ``False`` drops the ordinary phase; the model and task model then take
            their ordinary step on each meta-train batch right after the meta step (ablation IV).
        seed: seeds every sample order.
        num_workers: data-loader workers.
        checkpoint_every: also checkpoint every this many steps (0: only after each phase).
        progress: show progress bars.
        task_adaptation: ``"current_model"`` (paper) or ``"virtual_model"``: the task model's
            virtual step learns from the model's virtual step, differentiated (see ``MetaStep``).
        map_gradient: ``"full"`` (the exact meta-gradient), ``"centred"`` (its global part per
            image removed) or ``"shift_removed"`` (its part along a uniform shift of the model's
            output removed); see ``MetaStep`` and ``metaloss.map_gradient``.
        inner_steps: virtual steps of the model per meta iteration (paper: 1; more are unrolled
            in ``mode="exact"`` or differentiated implicitly; see ``MetaStep``).
        cg_iterations: conjugate-gradient iterations of ``mode="implicit"``.
        ridge: added to the inner Hessian's diagonal in ``mode="implicit"``.
        meta_test: ``"held_out"`` (paper): the meta-test batch comes from the half of the data
            set that the meta-train batches do not; ``"meta_train"``: the task loss is taken on
            the meta-train batch itself, after the virtual step it shaped (the meta-gradient then
            includes each pixel's direct effect on its own fused value).
        virtual_step: ``"model"`` (paper): the meta step's virtual step moves the model's
            parameters; ``"output"``: it moves the model's output pixel by pixel, judged on the
            meta-train batch (see ``MetaStep``).
        output_lr: the per-element step of ``virtual_step="output"``.
        second_order: how ``mode="exact"`` differentiates the model's virtual step, ``"jvp"``
            (half the memory), ``"compiled_jvp"`` (the same, compiled: faster after a compilation)
            or ``"double_backward"`` (see ``MetaStep``).

    Examples:
        >>> config = MetaTrainerConfig(epochs=10, meta_iterations=50, warmup_epochs=1, outer_rule="max_normalized")
        >>> config.batch_size, config.mode, config.inner_steps  # the paper's, unless given
        (2, 'exact', 1)
        >>> MetaTrainerConfig(warmup_epochs=60)
        Traceback (most recent call last):
        ...
        ValueError: warmup_epochs must be in [0, epochs=50], got 60
    """

    epochs: int = 50
    meta_iterations: int = 200
    meta_accumulation: int = 1
    warmup_epochs: int = 0
    frozen_loss_epochs: int = 0
    model_iterations: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    outer_rule: OuterRule = "adam"
    outer_lr: float = 1e-4
    mode: HypergradientMode = "exact"
    fd_eps: float = 1e-4
    buffer_policy: str = BufferPolicy.DISCARD.value
    nonfinite: Literal["skip", "raise"] = "skip"
    autocast_dtype: Literal["bfloat16", "float16"] | None = None
    activation_checkpointing: bool = False
    joint_task_weight: float = 0.0
    model_phase: bool = True
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    map_gradient: MapGradient = "full"
    task_adaptation: Literal["current_model", "virtual_model"] = "current_model"
    inner_steps: int = 1
    cg_iterations: int = 20
    ridge: float = 0.0
    meta_test: Literal["held_out", "meta_train"] = "held_out"
    virtual_step: VirtualStep = "model"
    output_lr: float = 0.5
    second_order: SecondOrder = "jvp"

    def __post_init__(self) -> None:
        if self.meta_test not in ("held_out", "meta_train"):
            raise ValueError(f"meta_test must be 'held_out' or 'meta_train', got {self.meta_test!r}")
        if self.inner_steps > 1 and self.mode == "finite_difference":
            raise ValueError("inner_steps > 1 needs mode 'exact' (unrolled) or 'implicit', not 'finite_difference'")
        for name in ("epochs", "batch_size", "meta_accumulation", "inner_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.frozen_loss_epochs <= self.epochs - self.warmup_epochs:
            raise ValueError(
                f"frozen_loss_epochs must be in [0, epochs - warmup_epochs = {self.epochs - self.warmup_epochs}], "
                f"got {self.frozen_loss_epochs}"
            )
        if self.meta_iterations < 0:
            raise ValueError(f"meta_iterations must be >= 0, got {self.meta_iterations}")
        if self.model_iterations is not None and self.model_iterations < 0:
            raise ValueError(f"model_iterations must be >= 0 or None, got {self.model_iterations}")


@dataclass
class Position:
    """Where the schedule stands: the next step to run.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]  # your samples (any map-style data set)
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=1, meta_iterations=2, batch_size=2, progress=False))
        >>> trainer.position  # nothing run yet: the meta phase of epoch 0
        Position(epoch=0, phase='meta', step=0)
        >>> trainer.fit(max_steps=3)  # stops (after a checkpoint, if it has a folder) after 3 steps
        3
        >>> trainer.position  # two meta steps done, one ordinary step of four
        Position(epoch=0, phase='model', step=1)
    """

    epoch: int = 0
    phase: Literal["meta", "model"] = "meta"
    step: int = 0


@dataclass(frozen=True)
class ModelStepStats:
    """What one ordinary iteration measured.

    Attributes:
        model_loss: the learnable loss (weights detached) the model stepped on.
        task_loss: the task loss the task model stepped on.
        weight_mean: the mean weight of each source.
        terms: each term of the learnable loss.

    Examples:
        What a ``Callback`` receives after each ordinary iteration:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]  # your samples (any map-style data set)
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> from metaloss import Callback
        >>> class PrintTaskLoss(Callback):
        ...     def on_model_step(self, trainer, stats):
        ...         print(f"task loss {stats.task_loss:.1f}, weights {[round(w, 2) for w in stats.weight_mean]}")
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=1, meta_iterations=2, batch_size=2, progress=False),
        ...                       callbacks=[PrintTaskLoss()])
        >>> trainer.fit()  # two meta steps, then one pass of four batches  # doctest: +ELLIPSIS
        task loss 0..., weights [0.5, 0.5]
        ...
        6
    """

    model_loss: float
    task_loss: float
    weight_mean: tuple[float, ...]
    terms: dict[str, float] = field(default_factory=dict)


class MetaTrainer:
    """Train a model, its task model and its learnable loss with Algorithm 1.

    Args:
        model: ``F``.
        loss: the learnable loss (its generator is ``G``).
        task_model: ``T``.
        task_loss: ``task_loss(task_model_output, batch) -> scalar``.
        dataset: a map-style data set of the user's samples (a torch Dataset, or any sequence).
        config: the schedule (``MetaTrainerConfig``).
        collate_fn: builds a batch from samples (default: PyTorch's).
        adapter: reads batches (default ``SourcesAdapter``).
        model_optimizer: default Adam at ``config.lr``.
        task_optimizer: default Adam at ``config.lr``; none for a task model without trainable
            parameters (a fixed metric such as ``nn.Identity()`` with a quality objective as the
            task loss), which is then never stepped.
        outer_optimizer: default ``make_outer_optimizer`` from the config.
        schedulers: learning-rate schedulers stepped at the end of every epoch.
        inner: the model's inner update rule (default SGD at its optimiser's rate).
        task_inner: the task model's inner update rule (default SGD at its optimiser's rate).
        callbacks: objects with ``Callback`` methods.
        checkpoint_dir: where ``last.pt`` is written (``None``: no checkpoints).

    Examples:
        Algorithm 1 on your data: dict samples with the two sources and the task's labels.

        >>> import tempfile
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]  # your samples (any map-style data set)
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> run = tempfile.mkdtemp()
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=2, meta_iterations=3, batch_size=2, progress=False),
        ...                       checkpoint_dir=run)
        >>> trainer.fit(max_steps=5)  # stopped early, checkpointed
        5
        >>> trainer.fit(resume=f"{run}/last.pt")  # continues where it stopped: 14 steps in all
        9

        Each epoch: ``meta_iterations`` outer steps of the generator (meta-train and meta-test
        batches from the two halves of the data), then one pass of ordinary steps of the model
        and the task model (``model_iterations``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LearnableLoss,
        task_model: nn.Module,
        task_loss: TaskLoss,
        dataset: Dataset[Any] | Sequence[Any],
        *,
        config: MetaTrainerConfig | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        adapter: BatchAdapter[Any] | None = None,
        model_optimizer: torch.optim.Optimizer | None = None,
        task_optimizer: torch.optim.Optimizer | None = None,
        outer_optimizer: torch.optim.Optimizer | None = None,
        schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
        inner: InnerRule | None = None,
        task_inner: InnerRule | None = None,
        callbacks: Iterable[Any] = (),
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(dataset, DataLoader):
            raise TypeError("MetaTrainer takes a Dataset (it builds its own loaders); pass loader.dataset")
        if not hasattr(dataset, "__len__"):
            raise TypeError("MetaTrainer needs a map-style Dataset with __len__")
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the data set is empty: MetaTrainer has nothing to train on")
        self.config = config or MetaTrainerConfig()
        self.model = model
        self.loss = loss
        self.task_model = task_model
        self.task_loss = task_loss
        self.dataset: Dataset[Any] = dataset  # type: ignore[assignment]  # a Sequence is a map-style data set
        self.collate_fn = collate_fn
        self.adapter: BatchAdapter[Any] = adapter or SourcesAdapter()
        cfg = self.config
        self.model_optimizer = model_optimizer or torch.optim.Adam(model.parameters(), lr=cfg.lr)
        task_params = [p for p in task_model.parameters() if p.requires_grad]
        self.task_optimizer: torch.optim.Optimizer | None = task_optimizer or (
            torch.optim.Adam(task_params, lr=cfg.lr) if task_params else None
        )
        generator_params = [p for p in loss.parameters() if p.requires_grad]
        self.learns_loss = bool(generator_params)
        self.outer_optimizer = outer_optimizer or (
            make_outer_optimizer(cfg.outer_rule, generator_params, cfg.outer_lr) if generator_params else None
        )
        self.schedulers = list(schedulers)
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.rank, self.world_size = rank_and_world_size()
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, None: None}[cfg.autocast_dtype]
        self.autocast_dtype = dtype
        self.meta_step = MetaStep(
            model,
            loss,
            task_model,
            task_loss,
            outer_optimizer=self.outer_optimizer,
            model_optimizer=self.model_optimizer,
            task_optimizer=self.task_optimizer,
            adapter=self.adapter,
            inner=inner,
            task_inner=task_inner,
            mode=cfg.mode,
            fd_eps=cfg.fd_eps,
            buffer_policy=cfg.buffer_policy,
            nonfinite=cfg.nonfinite,
            autocast_dtype=dtype,
            activation_checkpointing=cfg.activation_checkpointing,
            map_gradient=cfg.map_gradient,
            task_adaptation=cfg.task_adaptation,
            inner_steps=cfg.inner_steps,
            cg_iterations=cfg.cg_iterations,
            ridge=cfg.ridge,
            virtual_step=cfg.virtual_step,
            output_lr=cfg.output_lr,
            second_order=cfg.second_order,
        )
        # Views that run F and T on copies of their buffers (second forwards in model_step).
        self._model_discard = StatelessModule(unwrap(model), BufferPolicy.DISCARD)
        self._task_discard = StatelessModule(unwrap(task_model), BufferPolicy.DISCARD)
        self.position = Position()
        self.global_step = 0
        if len(dataset) < 2 and self.learns_loss and cfg.meta_iterations > 0:  # type: ignore[arg-type]
            raise ValueError("the data set needs at least 2 samples for disjoint meta-train / meta-test subsets")

    # ------------------------------------------------------------------ data
    @property
    def device(self) -> torch.device:
        """The model's device (batches are moved there)."""
        return next(self.model.parameters()).device

    def _orders(self, epoch: int) -> tuple[list[int], list[int], list[int]]:
        """Meta-train, meta-test and ordinary sample orders of ``epoch`` (deterministic)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        perm = torch.randperm(n, generator=g).tolist()
        half = n // 2
        need = cfg.meta_iterations * cfg.meta_accumulation * cfg.batch_size
        # Under DDP, rank r takes every world-th sample of the one global order, from the r-th on.
        r, w = self.rank, self.world_size
        meta_train = [perm[(i * w + r) % half] for i in range(need)] if half else []
        meta_test = [perm[half + (i * w + r) % half] for i in range(need)] if half else []
        order = torch.randperm(n, generator=g).tolist()
        if cfg.model_iterations is not None:
            order = [order[(i * w + r) % n] for i in range(cfg.model_iterations * cfg.batch_size)]
        else:
            order = order[r::w][: n // w]  # the same number of steps on every rank
        return meta_train, meta_test, order

    def _loader(self, indices: list[int]) -> DataLoader[Any]:
        return DataLoader(
            Subset(self.dataset, indices),
            batch_size=self.config.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # An own generator: creating the loader must not draw from the global RNG, or a
            # resumed run would see a different global random stream than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _batches(self, indices: list[int], start: int) -> Iterator[Any]:
        for batch in self._loader(indices[start * self.config.batch_size :]):
            yield move_to_device(batch, self.device)

    # ----------------------------------------------------------------- steps
    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            yield

    def model_step(self, batch: Any) -> ModelStepStats:
        """One ordinary iteration: the model on the learnable loss (weights detached), the task
        model on the task loss of the detached prediction (eq. 8 and 9)."""
        adapter = self.adapter
        sources = adapter.sources(batch)
        check_sources(sources)
        joint = self.config.joint_task_weight
        with self._autocast():
            prediction = self.model(*adapter.model_args(batch))
        out = self.loss(sources, prediction, detach_weights=True)
        model_total = out.total
        # The second forward of each module in this step leaves its buffers (BatchNorm running
        # statistics) alone: they move once per ordinary step, as in a plain training loop.
        # Under DDP the wrapped module runs as before (DDP must see its own forward).
        single = self.world_size == 1
        with self._autocast(), torch.set_grad_enabled(joint > 0):
            args = adapter.task_model_args(batch)
            task_view = self._model_discard(self._model_discard.parameters, *args) if single else self.model(*args)
        if joint > 0:
            with self._autocast():  # T's parameters detached: this backward steps only the model
                joint_args = adapter.task_args(batch, task_view)
                joint_out = (
                    self._task_discard(self._task_discard.snapshot(False), *joint_args)
                    if single
                    else unwrap(self.task_model)(*joint_args)
                )
            model_total = model_total + joint * checked_task_loss(self.task_loss, joint_out, batch)
        self.model_optimizer.zero_grad(set_to_none=True)
        model_total.backward(inputs=[p for p in self.model.parameters() if p.requires_grad])
        self.model_optimizer.step()
        with self._autocast():
            task_out = self.task_model(*adapter.task_args(batch, task_view.detach()))
        task_value = checked_task_loss(self.task_loss, task_out, batch)
        if self.task_optimizer is not None:  # a fixed task model (no parameters) is only evaluated
            self.task_optimizer.zero_grad(set_to_none=True)
            task_value.backward()
            self.task_optimizer.step()
        return ModelStepStats(
            model_loss=float(out.total.detach()),
            task_loss=float(task_value.detach()),
            weight_mean=weight_statistics(out.weights)[0],
            terms={k: float(v.detach()) for k, v in out.terms.items()},
        )

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: modules, optimisers, schedulers, RNG, position.

        Under DDP it gathers every rank's RNG state, so every rank must call it together.
        """
        return {
            "model": unwrap(self.model).state_dict(),
            "loss": self.loss.state_dict(),
            "task_model": unwrap(self.task_model).state_dict(),
            "model_optimizer": self.model_optimizer.state_dict(),
            "task_optimizer": self.task_optimizer.state_dict() if self.task_optimizer else None,
            "outer_optimizer": self.outer_optimizer.state_dict() if self.outer_optimizer else None,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": all_gather_objects(get_rng_state()),  # one per rank
            "position": dataclasses.asdict(self.position),
            "global_step": self.global_step,
            "skipped_total": self.meta_step.skipped_total,
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by ``state_dict``."""
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.world_size:
            raise ValueError(f"the checkpoint was written by {len(rng)} rank(s); this run has {self.world_size}")
        unwrap(self.model).load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        unwrap(self.task_model).load_state_dict(state["task_model"])
        self.model_optimizer.load_state_dict(state["model_optimizer"])
        if self.task_optimizer is not None and state["task_optimizer"] is not None:
            self.task_optimizer.load_state_dict(state["task_optimizer"])
        if self.outer_optimizer is not None and state["outer_optimizer"] is not None:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        for scheduler, s in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(s)
        set_rng_state(rng[self.rank])
        self.position = Position(**state["position"])
        self.global_step = int(state["global_step"])
        self.meta_step.skipped_total = int(state["skipped_total"])

    def save(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write the checkpoint atomically (default ``checkpoint_dir/last.pt``).

        Under DDP every rank must call it (the RNG states are gathered); rank 0 writes.
        """
        if path is None:
            if self.checkpoint_dir is None:
                return None
            path = self.checkpoint_dir / "last.pt"
        state = self.state_dict()
        if self.rank != 0:
            return None
        return save_checkpoint(state, path)

    # ------------------------------------------------------------------- fit
    def _emit(self, hook: str, *args: Any) -> None:
        if self.rank != 0:  # loggers write once
            return
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(self, *args)

    def _after_step(self, budget: list[int]) -> bool:
        """Count a step, checkpoint when due; ``True`` when ``max_steps`` is used up."""
        self.global_step += 1
        every = self.config.checkpoint_every
        if every and self.global_step % every == 0:
            self.save()
        budget[0] -= 1
        return budget[0] == 0

    def _run_phase(
        self, name: str, steps: int, items: Iterator[Any], run_one: Callable[[Any], dict[str, str]], budget: list[int]
    ) -> bool:
        """Run the rest of one phase; ``True`` when ``max_steps`` ran out (checkpoint written)."""
        cfg = self.config
        start = self.position.step
        desc = f"epoch {self.position.epoch + 1}/{cfg.epochs} {name}"
        quiet = not cfg.progress or self.rank != 0
        with tqdm(total=steps, initial=start, desc=desc, disable=quiet, leave=False) as bar:
            # range first: once it is exhausted, zip pulls (and loads) no further batch.
            for step, item in zip(range(start, steps), items):
                postfix = run_one(item)
                self.position.step = step + 1
                bar.update(1)
                bar.set_postfix(postfix)
                if self._after_step(budget):
                    self.save()
                    return True
        return False

    def _meta_iteration(self, pairs: Sequence[tuple[Any, Any]]) -> dict[str, str]:
        """One outer step of the loss generator on the mean meta-gradient of ``pairs``."""
        stats = self.meta_step.step_averaged(pairs)
        if not self.config.model_phase:  # ablation IV: the ordinary steps ride along, and are reported
            for pair in pairs:
                self._emit("on_model_step", self.model_step(pair[0]))
        self._emit("on_meta_step", stats)
        return {
            "outer": f"{stats.outer_loss:.4g}",
            "hg": f"{stats.hypergrad_norm:.2e}",
            "skipped": str(stats.skipped_total),
        }

    def _model_iteration(self, batch: Any) -> dict[str, str]:
        stats = self.model_step(batch)
        self._emit("on_model_step", stats)
        return {"model": f"{stats.model_loss:.4g}", "task": f"{stats.task_loss:.4g}"}

    def fit(self, resume: str | os.PathLike[str] | None = None, max_steps: int | None = None) -> int:
        """Run the schedule from the start, or from a checkpoint.

        Args:
            resume: a checkpoint written by ``save``; training continues where it stopped.
            max_steps: stop (after checkpointing) once this many steps have run in this call
                (0: run none).

        Returns:
            The number of steps (meta and ordinary) this call ran: 0 when resuming a finished run.
        """
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
        if resume is not None:
            self.load_state_dict(load_checkpoint(resume, map_location=self.device))
        start = self.global_step
        if max_steps == 0:
            return 0
        try:
            self._fit(max_steps)
            return self.global_step - start
        except KeyboardInterrupt:
            where = (
                f"resume from {self.checkpoint_dir / 'last.pt'}" if self.checkpoint_dir else "no checkpoint_dir was set"
            )
            print(
                f"\ninterrupted at epoch {self.position.epoch + 1}, {self.position.phase} step {self.position.step}; "
                f"{where} (the last checkpoint written, with checkpoint_every={self.config.checkpoint_every})",
                flush=True,
            )
            raise

    def _fit(self, max_steps: int | None) -> None:
        cfg = self.config
        budget = [max_steps if max_steps is not None else -1]
        self.model.train()
        self.task_model.train()
        self.loss.train()
        while self.position.epoch < cfg.epochs:
            epoch = self.position.epoch
            meta_train, meta_test, order = self._orders(epoch)
            if self.position.phase == "meta":
                meta_epoch = cfg.warmup_epochs <= epoch < cfg.epochs - cfg.frozen_loss_epochs
                steps = cfg.meta_iterations if self.learns_loss and meta_epoch else 0
                k = cfg.meta_accumulation
                start = self.position.step * k
                if cfg.meta_test == "meta_train":
                    pairs = _chunks(((b, b) for b in self._batches(meta_train, start)), k)
                else:
                    pairs = _chunks(zip(self._batches(meta_train, start), self._batches(meta_test, start)), k)
                if self._run_phase("meta", steps, pairs, self._meta_iteration, budget):
                    return
                self.position = Position(epoch, "model", 0)
                self.save()
            if self.position.phase == "model":
                steps = math.ceil(len(order) / cfg.batch_size) if cfg.model_phase else 0
                batches = self._batches(order, self.position.step)
                if self._run_phase("model", steps, batches, self._model_iteration, budget):
                    return
                for scheduler in self.schedulers:
                    scheduler.step()
                self.position = Position(epoch + 1, "meta", 0)
                self.save()
                self._emit("on_epoch_end", epoch)
        self._emit("on_fit_end")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one may be shorter), pulled lazily."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
