"""MetaTrainer: a toy with a known answer, bit-identical resume, logging, data errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from metaloss import (
    ConstantWeights,
    CSVLogger,
    InnerSGD,
    LearnableLoss,
    MetaTrainer,
    MetaTrainerConfig,
    TensorBoardLogger,
)
from tests.toy import (
    InformativeSource,
    SmallFusion,
    SmallGenerator,
    SmallSegmenter,
    seg_loss,
    weighted_squared_error,
)


def _trainer(dataset, tmp_path: Path | None = None, batchnorm: bool = False, **config) -> MetaTrainer:
    torch.manual_seed(0)
    fusion, task = SmallFusion(batchnorm=batchnorm), SmallSegmenter(batchnorm=batchnorm)
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    cfg = MetaTrainerConfig(
        **{"epochs": 3, "meta_iterations": 8, "batch_size": 4, "lr": 1e-2, "outer_lr": 1e-2, "progress": False} | config
    )
    return MetaTrainer(
        fusion,
        loss,
        task,
        seg_loss,
        dataset,
        config=cfg,
        inner=InnerSGD(lr=0.1),
        task_inner=InnerSGD(lr=0.1),
        checkpoint_dir=tmp_path,
    )


def _mean_weights(trainer: MetaTrainer, dataset) -> list[float]:
    with torch.no_grad():
        a = torch.stack([dataset.items[i]["a"] for i in range(len(dataset))])
        b = torch.stack([dataset.items[i]["b"] for i in range(len(dataset))])
        w = trainer.loss.weights([a, b])
    return [w[:, 0].mean().item(), w[:, 1].mean().item()]


@pytest.mark.parametrize(("informative", "index"), [("b", 1), ("a", 0)])
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_generator_learns_to_weigh_the_informative_source(informative: str, index: int, mode: str) -> None:
    """The segmentation target is visible only in one source: G must learn to weigh it > 0.8."""
    dataset = InformativeSource(n=32, size=16, informative=informative)
    trainer = _trainer(dataset, mode=mode)
    assert _mean_weights(trainer, dataset)[index] < 0.7  # not already the answer
    trainer.fit()
    weights = _mean_weights(trainer, dataset)
    assert weights[index] > 0.8, weights


def _all_state(trainer: MetaTrainer) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("F", trainer.model), ("G", trainer.loss), ("T", trainer.task_model)):
        state |= {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    for prefix, opt in (
        ("oF", trainer.model_optimizer),
        ("oT", trainer.task_optimizer),
        ("oG", trainer.outer_optimizer),
    ):
        assert opt is not None
        for pid, st in opt.state_dict()["state"].items():
            state |= {f"{prefix}.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)}
    return state


@pytest.mark.parametrize("stop_after", [5, 8, 19])  # mid meta phase, at a phase end, mid model phase
def test_resume_equals_uninterrupted_run(tmp_path: Path, stop_after: int) -> None:
    dataset = InformativeSource(n=20, size=12, flip=True)  # random flips draw from the global RNG
    config = {"epochs": 2, "meta_iterations": 4, "batch_size": 2, "checkpoint_every": 3}
    full = _trainer(dataset, tmp_path / "full", batchnorm=True, **config)
    full.fit()

    interrupted = _trainer(dataset, tmp_path / "cut", batchnorm=True, **config)
    interrupted.fit(max_steps=stop_after)
    assert interrupted.global_step == stop_after
    torch.manual_seed(1234)  # a resumed process starts from another RNG state and other weights
    resumed = _trainer(dataset, tmp_path / "cut", batchnorm=True, **config)
    with torch.no_grad():
        for p in resumed.model.parameters():
            p.add_(1.0)
    resumed.fit(resume=tmp_path / "cut" / "last.pt")

    expected, got = _all_state(full), _all_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    assert resumed.global_step == full.global_step


def test_checkpoint_is_written_atomically(tmp_path: Path) -> None:
    trainer = _trainer(InformativeSource(n=8, size=8), tmp_path, epochs=1, meta_iterations=2)
    trainer.fit()
    assert (tmp_path / "last.pt").is_file()
    assert not list(tmp_path.glob("*.tmp")), "a temporary checkpoint file was left behind"
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 1, "phase": "meta", "step": 0}
    assert {"model", "loss", "task_model", "model_optimizer", "task_optimizer", "outer_optimizer", "rng"} <= set(state)


def test_csv_and_tensorboard_logging(tmp_path: Path) -> None:
    trainer = _trainer(InformativeSource(n=8, size=8), epochs=1, meta_iterations=3)
    trainer.callbacks = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer.fit()
    meta_rows = list(csv.DictReader((tmp_path / "csv" / "meta.csv").open()))
    model_rows = list(csv.DictReader((tmp_path / "csv" / "model.csv").open()))
    assert len(meta_rows) == 3 and len(model_rows) == 2  # 8 samples / batch 4
    assert {"outer_loss", "hypergrad_norm", "weight_mean_0", "weight_mean_1", "skipped"} <= set(meta_rows[0])
    assert all(float(r["hypergrad_norm"]) > 0 for r in meta_rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_fixed_weights_skip_the_meta_phase() -> None:
    dataset = InformativeSource(n=8, size=8)
    torch.manual_seed(0)
    loss = LearnableLoss(ConstantWeights(2), {"int": weighted_squared_error}, weights="given")
    trainer = MetaTrainer(
        SmallFusion(),
        loss,
        SmallSegmenter(),
        seg_loss,
        dataset,
        config=MetaTrainerConfig(epochs=1, batch_size=4, progress=False),
    )
    trainer.fit()
    assert trainer.global_step == 2 and trainer.outer_optimizer is None


@pytest.mark.parametrize("weights", [None, (1.0, 0.0), (0.0, 1.0), (0.25, 0.75)])
def test_constant_weights_weigh_each_source_as_given(weights: tuple[float, float] | None) -> None:
    a, b, fused = torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)
    w_a, w_b = weights or (0.5, 0.5)
    loss = LearnableLoss(ConstantWeights(2, weights=weights), {"int": weighted_squared_error}, weights="given")
    value = loss([a, b], fused).total
    expected = (w_a * (fused - a) ** 2 + w_b * (fused - b) ** 2).mean()
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(
    ("num_sources", "weights", "message"),
    [
        (1, None, "num_sources"),
        (2, (1.0,), "one entry per source"),
        (2, (1.0, -0.5), "non-negative"),
        (3, (0.5, float("nan"), 0.5), "finite"),
        (2, (1.0, 1.0), "sum to 1"),
    ],
)
def test_constant_weights_name_a_bad_argument(
    num_sources: int, weights: tuple[float, ...] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ConstantWeights(num_sources, weights=weights)


def test_empty_and_wrong_data_are_named() -> None:
    fusion, task = SmallFusion(), SmallSegmenter()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    with pytest.raises(ValueError, match="data set is empty"):
        MetaTrainer(fusion, loss, task, seg_loss, InformativeSource(n=0))
    with pytest.raises(TypeError, match="takes a Dataset"):
        MetaTrainer(fusion, loss, task, seg_loss, DataLoader(InformativeSource(n=4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 samples"):
        MetaTrainer(fusion, loss, task, seg_loss, InformativeSource(n=1))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _trainer(InformativeSource(n=4)).fit(resume="/nonexistent/last.pt")


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupt:
        def on_meta_step(self, trainer, stats) -> None:
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    dataset = InformativeSource(n=8, size=8)
    trainer = _trainer(dataset, tmp_path, epochs=1, meta_iterations=4, checkpoint_every=2)
    trainer.callbacks = [Interrupt()]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert f"resume from {tmp_path / 'last.pt'}" in capsys.readouterr().out
    resumed = _trainer(dataset, tmp_path, epochs=1, meta_iterations=4, checkpoint_every=2)
    resumed.fit(resume=tmp_path / "last.pt")
    assert resumed.global_step == 4 + 2  # 4 meta steps and 2 model steps in all


class _CountingStep:
    """Wraps MetaStep.accumulate / apply to count the meta-gradients and outer steps."""

    def __init__(self, trainer: MetaTrainer) -> None:
        self.pairs, self.outer = 0, 0
        self.epochs: list[int] = []
        step, accumulate, apply = trainer.meta_step, trainer.meta_step.accumulate, trainer.meta_step.apply

        def counted_accumulate(*pair):
            self.pairs += 1
            self.epochs.append(trainer.position.epoch)
            return accumulate(*pair)

        def counted_apply():
            self.outer += 1
            return apply()

        step.accumulate, step.apply = counted_accumulate, counted_apply  # type: ignore[method-assign]


def test_warmup_epochs_run_no_meta_phase_and_accumulation_averages_pairs() -> None:
    dataset = InformativeSource(32, informative="b")
    trainer = _trainer(dataset, epochs=3, meta_iterations=2, meta_accumulation=3, warmup_epochs=1)
    counts = _CountingStep(trainer)
    trainer.fit()
    assert counts.outer == 2 * 2  # epochs 2 and 3 only
    assert counts.pairs == 2 * 2 * 3  # three pairs per outer step
    assert set(counts.epochs) == {1, 2}


def test_frozen_loss_epochs_end_the_meta_phase_and_keep_training_the_model() -> None:
    dataset = InformativeSource(32, informative="b")
    trainer = _trainer(dataset, epochs=4, meta_iterations=2, warmup_epochs=1, frozen_loss_epochs=2)
    counts = _CountingStep(trainer)
    model_epochs: list[int] = []
    after_epoch: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (G's parameters, F's)

    class Record:
        def on_model_step(self, trainer: MetaTrainer, stats: object) -> None:
            model_epochs.append(trainer.position.epoch)

        def on_epoch_end(self, trainer: MetaTrainer, epoch: int) -> None:
            g, f = ([p.detach().clone() for p in net.parameters()] for net in (trainer.loss, trainer.model))
            after_epoch.append((g, f))

    trainer.callbacks.append(Record())
    trainer.fit()
    assert set(counts.epochs) == {1}  # epoch 2 of 4 only: one warm-up epoch, two frozen ones
    assert counts.outer == 2
    assert set(model_epochs) == {0, 1, 2, 3}  # the model trains in every epoch

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))

    assert not same(after_epoch[0][0], after_epoch[1][0])  # G learned in its meta epoch
    assert same(after_epoch[1][0], after_epoch[3][0])  # and kept its loss after it
    assert not same(after_epoch[1][1], after_epoch[3][1])  # while F trained on under it


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"meta_accumulation": 0}, "meta_accumulation"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 4}, "warmup_epochs"),
        ({"frozen_loss_epochs": -1}, "frozen_loss_epochs"),
        ({"warmup_epochs": 2, "frozen_loss_epochs": 2}, "frozen_loss_epochs"),
    ],
)
def test_bad_schedule_options_are_named(fields: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MetaTrainerConfig(epochs=3, **fields)  # type: ignore[arg-type]
