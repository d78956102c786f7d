"""MetaStep and MetaTrainer under DistributedDataParallel: two CPU processes (gloo).

One meta step with different batches per rank must leave the generator identical on both ranks
and equal to one step along the mean of the two ranks' meta-gradients, computed here in a single
process without any wrapper. A whole MetaTrainer run must agree across the ranks, shard the
samples, and resume from a checkpoint bit for bit on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from metaloss import InnerSGD, LearnableLoss, MetaStep, MetaTrainer, MetaTrainerConfig
from metaloss.distributed import leave_process_group, unwrap
from tests.toy import (
    InformativeSource,
    SmallFusion,
    SmallGenerator,
    SmallSegmenter,
    seg_loss,
    weighted_squared_error,
)

WORLD = 2
OUTER_LR = 0.5


def _batch(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(2, 1, 8, 8, generator=g),
        "b": torch.rand(2, 1, 8, 8, generator=g),
        "target": torch.randint(0, 2, (2, 8, 8), generator=g),
    }


def _parts() -> tuple[SmallFusion, LearnableLoss, SmallSegmenter]:
    torch.manual_seed(0)
    return SmallFusion(), LearnableLoss(SmallGenerator(), {"int": weighted_squared_error}), SmallSegmenter()


def _spawn(fn: Callable[[int, str, str], None], tmp_path: Path, prefix: str) -> list[dict[str, Any]]:
    """Run ``fn(rank, init_file, out_dir)`` in WORLD processes; what each saved as ``prefix{rank}.pt``."""
    mp.spawn(fn, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{prefix}{r}.pt") for r in range(WORLD)]


def _in_process_group(rank: int, init_file: str, work: Callable[[], None]) -> None:
    """Run ``work()`` as this rank of a gloo group of WORLD, then leave the group cleanly
    (``leave_process_group``) once ``work``'s objects, its DistributedDataParallel wrappers among
    them, are out of scope; on a failure, destroy the group without waiting for the others."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        work()
        leave_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    _in_process_group(rank, init_file, lambda: _meta_step_work(rank, out_dir))


def _meta_step_work(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    fusion, loss, task = _parts()
    meta = MetaStep(
        DistributedDataParallel(fusion),
        loss,
        DistributedDataParallel(task),
        seg_loss,
        outer_optimizer=torch.optim.SGD(loss.parameters(), lr=OUTER_LR),
        inner=InnerSGD(0.1),
        task_inner=InnerSGD(0.1),
    )
    fusion_before = {k: v.clone() for k, v in fusion.state_dict().items()}
    meta.step(_batch(10 + rank), _batch(20 + rank))
    unchanged = all(torch.equal(v, fusion.state_dict()[k]) for k, v in fusion_before.items())
    torch.save({"loss": loss.state_dict(), "fusion_unchanged": unchanged}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_meta_gradient_is_averaged_over_ranks(tmp_path: Path) -> None:
    ranks = _spawn(_rank, tmp_path, "rank")
    assert all(r["fusion_unchanged"] for r in ranks)

    # The same step in one process: each rank's meta-gradient, their mean, one SGD step.
    fusion, loss, task = _parts()
    meta = MetaStep(fusion, loss, task, seg_loss, inner=InnerSGD(0.1), task_inner=InnerSGD(0.1))
    per_rank = [meta.hypergradient(_batch(10 + r), _batch(20 + r))[0].grads for r in range(WORLD)]
    names = [name for name, p in loss.named_parameters() if p.requires_grad]
    for name, p, *grads in zip(names, meta.generator_parameters, *per_rank, strict=True):
        expected = p.detach() - OUTER_LR * torch.stack(grads).mean(0)
        torch.testing.assert_close(ranks[0]["loss"][name], expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(ranks[0]["loss"][name], ranks[1]["loss"][name])  # the ranks agree exactly
    # The two ranks' batches differ, so their meta-gradients do (the mean is not trivially either).
    assert not all(torch.allclose(a, b) for a, b in zip(*per_rank, strict=True))


def _ddp_trainer(out: Path) -> MetaTrainer:
    torch.manual_seed(0)
    fusion, task = SmallFusion(batchnorm=True), SmallSegmenter(batchnorm=True)
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    config = MetaTrainerConfig(
        epochs=2, meta_iterations=3, batch_size=2, lr=1e-2, outer_lr=1e-2, checkpoint_every=2, progress=False
    )
    return MetaTrainer(
        DistributedDataParallel(fusion),
        loss,
        DistributedDataParallel(task),
        seg_loss,
        InformativeSource(n=16, size=8, flip=True),  # flips draw from each rank's global RNG
        config=config,
        inner=InnerSGD(0.1),
        task_inner=InnerSGD(0.1),
        checkpoint_dir=out,
    )


def _state(trainer: MetaTrainer) -> dict[str, Tensor]:
    modules = {"F": unwrap(trainer.model), "G": trainer.loss, "T": unwrap(trainer.task_model)}
    return {f"{name}.{k}": v.clone() for name, m in modules.items() for k, v in m.state_dict().items()}


def _trainer_rank(rank: int, init_file: str, out_dir: str) -> None:
    _in_process_group(rank, init_file, lambda: _trainer_work(rank, out_dir))


def _trainer_work(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    full = _ddp_trainer(out / "full")
    full.fit()
    cut = _ddp_trainer(out / "cut")
    cut.fit(max_steps=5)  # mid meta phase of the second epoch
    torch.manual_seed(100 + rank)  # the resumed processes start from other RNG states
    resumed = _ddp_trainer(out / "cut")
    resumed.fit(resume=out / "cut" / "last.pt")
    meta_train, meta_test, order = full._orders(0)
    torch.save(
        {"full": _state(full), "resumed": _state(resumed), "orders": (meta_train, meta_test, order)},
        out / f"trainer{rank}.pt",
    )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_trainer_under_ddp_agrees_across_ranks_and_resumes_bit_identically(tmp_path: Path) -> None:
    ranks = _spawn(_trainer_rank, tmp_path, "trainer")
    for key, value in ranks[0]["full"].items():
        # DDP keeps parameters in step; BatchNorm buffers are broadcast from rank 0 at each
        # forward, then updated by the rank's own batch, so they agree only within a rank.
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(value, ranks[1]["full"][key]), f"{key} differs between the ranks"
        for r in ranks:
            assert torch.equal(r["full"][key], r["resumed"][key]), f"{key} differs after resume"
    (train0, test0, order0), (train1, test1, order1) = (r["orders"] for r in ranks)
    assert not set(train0) & set(train1) and not set(test0) & set(test1) and not set(order0) & set(order1)
    assert len(order0) == len(order1) == 8  # 16 samples shared by 2 ranks
    state = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert len(state["rng"]) == WORLD and not any(k.startswith("module.") for k in state["model"])
