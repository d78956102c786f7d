"""Engine bugs users hit (issue 12, items 5 and 6), each a test that fails without its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from metaloss import CSVLogger, HypergradientResult, InnerAdam, LearnableLoss, MetaStep, MetaTrainer, MetaTrainerConfig
from tests.toy import InformativeSource, SmallFusion, SmallGenerator, SmallSegmenter, seg_loss, weighted_squared_error


def _trainer(tmp_path: Path | None = None, **config) -> MetaTrainer:
    torch.manual_seed(0)
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    cfg = MetaTrainerConfig(**{"epochs": 1, "meta_iterations": 2, "batch_size": 4, "progress": False} | config)
    callbacks = [CSVLogger(tmp_path / "logs")] if tmp_path else []
    return MetaTrainer(
        SmallFusion(), loss, SmallSegmenter(), seg_loss, InformativeSource(8), config=cfg, callbacks=callbacks
    )


def test_max_steps_zero_runs_nothing() -> None:
    trainer = _trainer()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(max_steps=0)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(max_steps=-1)


def test_ordinary_steps_are_reported_without_a_model_phase(tmp_path: Path) -> None:
    _trainer(tmp_path, model_phase=False).fit()
    rows = (tmp_path / "logs" / "model.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header, one ordinary step per meta iteration


def test_hypergradient_norm_is_nan_for_an_infinite_entry() -> None:
    result = HypergradientResult((torch.tensor([1.0, float("inf")]),), torch.tensor(0.0), torch.tensor(0.0))
    assert torch.isnan(torch.tensor(result.norm()))


def test_inner_adam_for_the_task_model_names_the_task_optimizer() -> None:
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    task = SmallSegmenter()
    meta = MetaStep(
        SmallFusion(),
        loss,
        task,
        seg_loss,
        task_inner=InnerAdam(lr=1e-3),
        task_optimizer=torch.optim.SGD(task.parameters(), lr=0.1),
    )
    batch = {"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8), "target": torch.randint(0, 2, (2, 8, 8))}
    with pytest.raises(ValueError, match="task_optimizer for task_inner=.*got SGD"):
        meta.hypergradient(batch, batch)


class _ScaledTerm(nn.Module):
    """A term with a buffer, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))

    scale: Tensor

    def forward(self, prediction: Tensor, sources, weights: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        return self.scale * weighted_squared_error(prediction, sources, weights)


def test_module_terms_follow_the_loss_in_to_and_state_dict() -> None:
    loss = LearnableLoss(SmallGenerator(), {"scaled": _ScaledTerm(), "plain": weighted_squared_error}).double()
    assert loss.term_modules["scaled"].scale.dtype == torch.float64
    assert "term_modules.scaled.scale" in loss.state_dict()


@pytest.mark.parametrize("joint", [0.0, 1.0])
def test_an_ordinary_step_moves_batchnorm_statistics_once(joint: float) -> None:
    """model_step runs F twice (fusion crop, task view) and, with joint_task_weight > 0, T twice:
    the running statistics of each must move once per step, as in a plain training loop."""
    torch.manual_seed(0)
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    fusion, task = SmallFusion(batchnorm=True), SmallSegmenter(batchnorm=True)
    cfg = MetaTrainerConfig(epochs=1, meta_iterations=0, batch_size=4, joint_task_weight=joint, progress=False)
    trainer = MetaTrainer(fusion, loss, task, seg_loss, InformativeSource(8), config=cfg)
    fusion.train(), task.train()
    batch = next(iter(trainer._loader(list(range(4)))))
    trainer.model_step(batch)
    counts = [int(b) for name, b in [*fusion.named_buffers(), *task.named_buffers()] if "num_batches_tracked" in name]
    assert counts and all(c == 1 for c in counts)
    before = [p.detach().clone() for p in fusion.parameters()]
    trainer.model_step(batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, fusion.parameters()))  # F still learns
