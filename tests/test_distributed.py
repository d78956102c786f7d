"""MetaStep under DistributedDataParallel: two CPU processes (gloo), different batches per rank.

The generator must end up identical on both ranks and equal to one step along the mean of the
two ranks' meta-gradients, computed here in a single process without any wrapper.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from metaloss import InnerSGD, LearnableLoss, MetaStep
from tests.toy import SmallFusion, SmallGenerator, SmallSegmenter, seg_loss, weighted_squared_error

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


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_meta_gradient_is_averaged_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
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
