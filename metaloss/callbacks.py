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
    """Hooks called by ``MetaTrainer`` (override the ones you need)."""

    def on_meta_step(self, trainer: MetaTrainer, stats: MetaStepStats) -> None:
        """After each meta iteration (step of the loss generator)."""

    def on_model_step(self, trainer: MetaTrainer, stats: ModelStepStats) -> None:
        """After each ordinary iteration of the model and the task model."""

    def on_epoch_end(self, trainer: MetaTrainer, epoch: int) -> None:
        """After each epoch (after the checkpoint of that epoch is written)."""

    def on_fit_end(self, trainer: MetaTrainer) -> None:
        """When ``fit`` returns."""


def flatten_stats(stats: Any) -> dict[str, float | int | bool]:
    """A stats dataclass as one flat dict (tuples become ``name_0``, dicts ``name/key``)."""
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
