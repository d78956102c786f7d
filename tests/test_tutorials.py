"""Each tutorial under ``examples/tutorials`` runs for a few steps on real components."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.samples import downsized_pairs, msrs_tree

TUTORIALS = Path(__file__).resolve().parents[1] / "examples" / "tutorials"


def _tutorial(name: str) -> ModuleType:
    """Import ``examples/tutorials/<name>.py`` as a module (no change to the import path)."""
    spec = importlib.util.spec_from_file_location(f"tutorial_{name}", TUTORIALS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def test_tutorial_1_trains_all_three_networks_in_your_own_loop() -> None:
    report = _tutorial("meta_step_in_your_loop").train(steps=5, seed=0)
    assert set(report) == {"weight_on_a_start", "weight_on_a_end", "iou_start", "iou_end"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in report.values())
    assert report["weight_on_a_end"] != report["weight_on_a_start"], "the meta step did not move G"


@pytest.mark.parametrize("task", ["smp", "tiny"])
def test_tutorial_2_trains_with_your_own_task_network_and_loss(task: str) -> None:
    tutorial = _tutorial("your_own_task_network")
    report = tutorial.train(task, epochs=1, meta_iterations=2, scenes=4)
    assert all(math.isfinite(v) for v in report.values())
    assert report["miou_after"] != report["miou_before"], "T did not learn"
    assert report["target_infrared"] != 0.5 and report["marking_visible"] != 0.5, "the meta step did not move G"
    with pytest.raises(ValueError, match="unknown task"):
        tutorial.build_task("resnet")


def test_tutorial_3_fuses_the_released_tasks(shared_data: Path, tmp_path: Path) -> None:
    means = _tutorial("other_fusion_tasks").fuse_released(shared_data / "ReFusion", tmp_path, tasks=("MIF", "MFIF"))
    assert set(means) == {"MIF", "MFIF"}
    for task, mean in means.items():
        assert set(mean) == {"EN", "SF", "SCD", "VIF", "Qabf", "SSIM"} and all(math.isfinite(v) for v in mean.values())
        assert list((tmp_path / task / "rgb").glob("*.png")), f"{task}: no colour output"


@pytest.mark.parametrize("learn", [True, False])
def test_tutorial_3_trains_on_your_own_folders(shared_data: Path, tmp_path: Path, learn: bool) -> None:
    meif = shared_data / "ReFusion" / "test_cases" / "MEIF"
    under, over = downsized_pairs(meif / "under", meif / "over", tmp_path)
    report = _tutorial("other_fusion_tasks").train_on_folders(
        under, over, steps=3, learn=learn, crop=48, task_size=(64, 64)
    )
    assert all(math.isfinite(v) for v in report.values())
    assert report["objective_after"] != report["objective_before"], "F did not learn"
    assert (report["weight_on_a"] != 0.5) == learn, "G moved without a meta step, or did not move with one"


def test_tutorial_5_reproduces_the_protocol_end_to_end(shared_data: Path, tmp_path: Path, capsys) -> None:
    root = msrs_tree(shared_data, tmp_path, {"train": ["00001D", "00002D", "00003N"], "test": ["00004N", "00008N"]})
    tutorial = _tutorial("reproduce_paper")
    quick = ["epochs=1", "meta_iterations=1", "model_iterations=1", "crop=32", "task_size=64,80", "device=cpu"]
    out = tmp_path / "runs"
    tutorial.reproduce("msrs", root, out, downstream_epochs=1, overrides=quick, dry_run=True)
    printed = capsys.readouterr().out
    assert printed.count("$ python examples/tdfusion/run.py") == 9  # check, 2 x (train, fuse x 2), evaluate, downstream
    assert not out.exists(), "a dry run wrote files"
    report = tutorial.reproduce("msrs", root, out, downstream_epochs=1, overrides=quick, device="cpu")
    assert set(report["fusion_metrics"]) == set(report["downstream"]) == {"tdfusion", "ablation_I"}
    assert all(math.isfinite(v) for m in report["fusion_metrics"].values() for v in m.values())
    text = (out / "report.md").read_text()
    assert "| TDFusion (paper, Table 2) | 86.04 | 75.09 |" in text and "| ablation_I (this run) |" in text
    assert json.loads((out / "report.json").read_text())["downstream"] == report["downstream"]


def test_tutorial_4_learns_a_loss_from_a_fixed_metric_without_a_task_network() -> None:
    tutorial = _tutorial("learned_loss_beyond_fusion")
    learned, fixed = tutorial.train(steps=5, seed=0, learn=True), tutorial.train(steps=5, seed=0, learn=False)
    assert all(math.isfinite(v) for v in [*learned.values(), *fixed.values()])
    assert fixed["weight_on_a_left"] == fixed["weight_on_a_right"] == 0.5
    assert learned["weight_on_a_left"] != 0.5, "the meta step did not move G"


def test_tutorial_4_output_step_trusts_each_half_its_better_sensor() -> None:
    """With a virtual step of F's output the weight at a pixel learns from the objective there:
    after 150 steps G trusts b on the left (where a is noisy) and a on the right."""
    learned = _tutorial("learned_loss_beyond_fusion").train(steps=150, seed=0, learn=True, virtual_step="output")
    assert learned["weight_on_a_left"] < 0.5 < learned["weight_on_a_right"]
