"""Callbacks and loggers for ``MetaTrainer``.

A callback is any object with some of the methods of ``Callback``; missing methods are
simply not called.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from metaloss.meta_step import MetaStepStats
    from metaloss.trainer import MetaTrainer, ModelStepStats

__all__ = ["CSVLogger", "Callback", "TensorBoardLogger", "flatten_stats"]


class Callback:
    """Hooks called by ``MetaTrainer`` (override the ones you need).

    Examples:
        Stop the generator's learning rate from staying high once its weights saturate:

        >>> import tempfile
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> class LowerOuterLr(Callback):
        ...     def on_meta_step(self, trainer, stats):
        ...         if max(stats.weight_mean) > 0.95:
        ...             for group in trainer.outer_optimizer.param_groups:
        ...                 group["lr"] *= 0.5
        ...     def on_fit_end(self, trainer):
        ...         print(f"done after {trainer.global_step} steps")
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=1, meta_iterations=2, batch_size=2, progress=False),
        ...                       callbacks=[LowerOuterLr()])
        >>> _ = trainer.fit()
        done after 6 steps
    """

    def on_meta_step(self, trainer: MetaTrainer, stats: MetaStepStats) -> None:
        """After each meta iteration (step of the loss generator)."""

    def on_model_step(self, trainer: MetaTrainer, stats: ModelStepStats) -> None:
        """After each ordinary iteration of the model and the task model."""

    def on_epoch_end(self, trainer: MetaTrainer, epoch: int) -> None:
        """After each epoch (after the checkpoint of that epoch is written)."""

    def on_fit_end(self, trainer: MetaTrainer) -> None:
        """When ``fit`` returns."""


def flatten_stats(stats: Any) -> dict[str, float | int | bool]:
    """A stats dataclass as one flat dict (tuples become ``name_0``, dicts ``name/key``).

    Examples:
        >>> from metaloss import ModelStepStats
        >>> flatten_stats(ModelStepStats(model_loss=0.5, task_loss=1.25, weight_mean=(0.25, 0.75), terms={"grad": 0.1}))
        {'model_loss': 0.5, 'task_loss': 1.25, 'weight_mean_0': 0.25, 'weight_mean_1': 0.75, 'terms/grad': 0.1}
    """
    flat: dict[str, float | int | bool] = {}
    for f in dataclasses.fields(stats):
        key, value = f.name, getattr(stats, f.name)
        if value is None or isinstance(value, torch.Tensor):  # maps (diagnostics) are not scalars
            continue
        if isinstance(value, (tuple, list)):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def append_csv_row(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV file at ``path``, writing the header first if the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


class CSVLogger(Callback):
    """Append every step's statistics to ``meta.csv`` and ``model.csv`` in ``directory``.

    Args:
        directory: created if missing; existing files are appended to (a resumed run continues
            them).

    Examples:
        >>> import tempfile
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> logs = tempfile.mkdtemp()
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=1, meta_iterations=2, batch_size=2, progress=False),
        ...                       callbacks=[CSVLogger(logs)])
        >>> _ = trainer.fit()
        >>> open(f"{logs}/meta.csv").readline().split(",")[:5]
        ['epoch', 'step', 'inner_loss', 'task_inner_loss', 'outer_loss']
        >>> sum(1 for _ in open(f"{logs}/model.csv"))  # a header and one row per ordinary step
        5
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, trainer: MetaTrainer, stats: Any) -> None:
        row = {"epoch": trainer.position.epoch, "step": trainer.position.step, **flatten_stats(stats)}
        append_csv_row(self.directory / name, row)

    def on_meta_step(self, trainer: MetaTrainer, stats: MetaStepStats) -> None:
        self._write("meta.csv", trainer, stats)

    def on_model_step(self, trainer: MetaTrainer, stats: ModelStepStats) -> None:
        self._write("model.csv", trainer, stats)


class TensorBoardLogger(Callback):
    """Write every step's statistics as TensorBoard scalars (``meta/...`` and ``model/...``).

    Args:
        log_dir: the event-file folder.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from metaloss import GlobalWeights, LearnableLoss, MetaTrainer, MetaTrainerConfig
        >>> data = [{"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8), "mask": torch.randint(0, 2, (8, 8))}
        ...         for _ in range(8)]
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> logs = tempfile.mkdtemp()
        >>> trainer = MetaTrainer(nn.Conv2d(2, 1, 3, padding=1), loss, nn.Conv2d(1, 2, 3, padding=1),
        ...                       lambda logits, batch: F.cross_entropy(logits, batch["mask"]), data,
        ...                       config=MetaTrainerConfig(epochs=1, meta_iterations=2, batch_size=2, progress=False),
        ...                       callbacks=[TensorBoardLogger(logs)])
        >>> _ = trainer.fit()  # then: tensorboard --logdir LOGS
        >>> import os
        >>> any(name.startswith("events.out.tfevents") for name in os.listdir(logs))
        True
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def _write(self, prefix: str, trainer: MetaTrainer, stats: Any) -> None:
        step = trainer.global_step
        for key, value in flatten_stats(stats).items():
            self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def on_meta_step(self, trainer: MetaTrainer, stats: MetaStepStats) -> None:
        self._write("meta", trainer, stats)

    def on_model_step(self, trainer: MetaTrainer, stats: ModelStepStats) -> None:
        self._write("model", trainer, stats)

    def on_epoch_end(self, trainer: MetaTrainer, epoch: int) -> None:
        self.writer.flush()

    def on_fit_end(self, trainer: MetaTrainer) -> None:
        self.writer.close()
