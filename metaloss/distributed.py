"""Helpers for running under ``torch.distributed`` (DistributedDataParallel), one process per rank.

The core never requires a process group: with none initialised every helper is the identity.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_gather_objects", "all_reduce_mean", "leave_process_group", "rank_and_world_size", "unwrap"]


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` without a process group).

    Examples:
        >>> rank_and_world_size()  # under torchrun --nproc-per-node 4, rank 2 gets (2, 4)
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(module: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper holds (the module itself otherwise).

    Examples:
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> unwrap(net) is net  # DistributedDataParallel(net) would give net back too
        True
    """
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_reduce_mean(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The mean of ``tensors`` over the ranks: one flat buffer, one all-reduce (the tensors
    themselves, detached, without a process group).

    Examples:
        >>> import torch
        >>> all_reduce_mean((torch.tensor([1.0, 3.0]),))  # one process: unchanged
        (tensor([1., 3.]),)
    """
    if rank_and_world_size()[1] == 1:
        return tuple(t.detach() for t in tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group).

    Examples:
        >>> all_gather_objects({"rng": 1})  # one process: a list of its own object
        [{'rng': 1}]
    """
    _, world = rank_and_world_size()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def leave_process_group() -> None:
    """The end of a distributed run: every rank waits for the others, then leaves the group
    (nothing without a process group).

    Call it once your DistributedDataParallel wrappers are dropped: what is no longer reachable
    is collected first, so their reducers are freed before the group they talk through rather
    than at interpreter exit after it, and no rank exits while gloo's threads still talk to it
    (either order aborted a gloo rank at exit: "terminate called without an active exception").

    Examples:
        >>> leave_process_group()  # one process, no group: nothing to leave
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
