"""How the engine reads the user's own batches.

The engine never assumes a tuple layout. It asks a ``BatchAdapter`` four questions about a
batch: the sources the learnable loss sees, the model's arguments for that loss, the model's
arguments for the view the task judges, and the task model's arguments given the model's
prediction. ``SourcesAdapter`` answers them for dict batches; write your own class with
these four methods for any other structure (no subclassing needed). One more is optional:
``task_sources(batch)``, the sources of the view the task judges, which
``MetaStep(virtual_step="output")`` takes its loss on (without it, ``sources`` is used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BatchAdapter", "SourcesAdapter", "move_to_device"]

BatchT = TypeVar("BatchT")
BatchT_contra = TypeVar("BatchT_contra", contravariant=True)


@runtime_checkable
class BatchAdapter(Protocol[BatchT_contra]):
    """The four views of a batch that a meta step needs.

    Any class with these four methods is an adapter (no subclassing needed).

    Examples:
        Batches that are tuples ``(ir, vis, labels)``:

        >>> import torch
        >>> class TupleAdapter:
        ...     def sources(self, batch):
        ...         return [batch[0], batch[1]]
        ...     def model_args(self, batch):
        ...         return (torch.cat([batch[0], batch[1]], dim=1),)
        ...     def task_model_args(self, batch):
        ...         return self.model_args(batch)
        ...     def task_args(self, batch, prediction):
        ...         return (prediction,)
        >>> isinstance(TupleAdapter(), BatchAdapter)
        True
    """

    def sources(self, batch: BatchT_contra) -> Sequence[Tensor]:
        """The K source tensors the learnable loss and its generator see."""
        ...

    def model_args(self, batch: BatchT_contra) -> tuple[Any, ...]:
        """Positional arguments of the model for the learnable-loss view."""
        ...

    def task_model_args(self, batch: BatchT_contra) -> tuple[Any, ...]:
        """Positional arguments of the model for the view the task judges."""
        ...

    def task_args(self, batch: BatchT_contra, prediction: Tensor) -> tuple[Any, ...]:
        """Positional arguments of the task model, given the model's prediction."""
        ...


@dataclasses.dataclass(frozen=True)
class SourcesAdapter:
    """Adapter for dict batches that name their sources.

    Args:
        keys: the batch keys of the K sources (learnable-loss view).
        task_keys: the keys of the sources for the task view; ``None`` reuses ``keys``.
        model_input: ``"concat"`` calls the model on the sources concatenated over channels
            (``model(torch.cat(sources, 1))``); ``"separate"`` calls ``model(*sources)``.

    Examples:
        Crops for the loss (``"a"``, ``"b"``), whole resized images for the task network:

        >>> import torch
        >>> batch = {"a": torch.rand(2, 1, 32, 32), "b": torch.rand(2, 1, 32, 32),
        ...          "task_a": torch.rand(2, 1, 64, 64), "task_b": torch.rand(2, 1, 64, 64)}
        >>> adapter = SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b"))
        >>> adapter.model_args(batch)[0].shape, adapter.task_model_args(batch)[0].shape
        (torch.Size([2, 2, 32, 32]), torch.Size([2, 2, 64, 64]))
    """

    keys: tuple[str, ...] = ("a", "b")
    task_keys: tuple[str, ...] | None = None
    model_input: Literal["concat", "separate"] = "concat"

    def _get(self, batch: Mapping[str, Any], keys: tuple[str, ...]) -> list[Tensor]:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"batch has no key(s) {missing}; it has {sorted(batch)}")
        return [batch[k] for k in keys]

    def _args(self, sources: list[Tensor]) -> tuple[Any, ...]:
        if self.model_input == "concat":
            return (torch.cat(sources, dim=1),)
        return tuple(sources)

    def sources(self, batch: Mapping[str, Any]) -> list[Tensor]:
        return self._get(batch, self.keys)

    def task_sources(self, batch: Mapping[str, Any]) -> list[Tensor]:
        """The sources of the task view (``MetaStep(virtual_step="output")`` takes its loss there)."""
        return self._get(batch, self.task_keys or self.keys)

    def model_args(self, batch: Mapping[str, Any]) -> tuple[Any, ...]:
        return self._args(self.sources(batch))

    def task_model_args(self, batch: Mapping[str, Any]) -> tuple[Any, ...]:
        return self._args(self.task_sources(batch))

    def task_args(self, batch: Mapping[str, Any], prediction: Tensor) -> tuple[Any, ...]:
        return (prediction,)


def move_to_device(obj: BatchT, device: torch.device, non_blocking: bool = True) -> BatchT:
    """Move every tensor inside mappings, sequences and dataclasses to ``device``.

    Examples:
        >>> import torch
        >>> batch = {"a": torch.rand(1, 1, 4, 4), "names": ["00001D"], "det": {"boxes": torch.zeros(0, 4)}}
        >>> moved = move_to_device(batch, torch.device("cpu"))
        >>> moved["a"].device.type, moved["names"], moved["det"]["boxes"].shape
        ('cpu', ['00001D'], torch.Size([0, 4]))
    """
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)  # type: ignore[return-value]
    if isinstance(obj, Mapping):
        return type(obj)({k: move_to_device(v, device, non_blocking) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device, non_blocking) for v in obj))  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, non_blocking) for v in obj)  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_to_device(getattr(obj, f.name), device, non_blocking) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)  # type: ignore[return-value]
    return obj
