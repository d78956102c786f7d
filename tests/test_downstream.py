"""Downstream scores: hand-checked cases, ultralytics' matching, and the protocol on real pairs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tdfusion.cli import main
from tdfusion.downstream import (
    TASK_SEED_STRIDE,
    average_scores,
    confusion_matrix,
    detection_scores,
    segmentation_scores,
)
from tdfusion.study import downstream_miou
from tdfusion.synthetic import make_scenes

from metaloss.fusion.image_io import read_grey


def test_segmentation_scores_by_hand() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]  # the 255 pixel is ignored
    scores = segmentation_scores(conf, ["bg", "car", "person"])
    iou = [1 / 3, 2 / 3, 2 / 3]
    acc = [1 / 2, 1.0, 2 / 3]
    assert scores["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert scores["mAcc"] == pytest.approx(100 * np.mean(acc))
    assert scores["per_class"]["car"] == {"IoU": pytest.approx(200 / 3), "Acc": pytest.approx(100.0)}


def test_detection_scores_with_ultralytics_matching() -> None:
    names = ["person", "car"]
    size = (100, 200)
    boxes = np.array([[0.25, 0.5, 0.1, 0.4], [0.7, 0.5, 0.2, 0.2]], np.float32)  # cx, cy, w, h
    classes = np.array([0, 1])
    xyxy = np.array([[40, 30, 60, 70], [120, 40, 160, 60]], np.float32)
    perfect = torch.tensor(np.c_[xyxy, [0.9, 0.8], classes], dtype=torch.float32)
    scores = detection_scores([perfect], [(boxes, classes)], names, size)
    assert scores["mAP50"] == pytest.approx(100, abs=0.5) and scores["mAP75"] == pytest.approx(100, abs=0.5)
    shifted = perfect.clone()
    shifted[1, [0, 2]] += 8  # the car box moves by 8 px: IoU 0.6, a hit at 0.5 but not at 0.75
    scores = detection_scores([shifted], [(boxes, classes)], names, size)
    assert scores["per_class"]["car"]["AP50"] == pytest.approx(100, abs=0.5)
    assert scores["per_class"]["car"]["AP75"] == pytest.approx(0, abs=0.5)
    missed = detection_scores([perfect[:1]], [(boxes, classes)], names, size)
    assert missed["per_class"]["car"] == {"AP50": 0.0, "AP75": 0.0} and missed["mAP50"] == pytest.approx(50, abs=0.5)


def test_average_scores_averages_nested_scores_key_by_key() -> None:
    runs = [
        {"mIoU": 40.0, "per_class": {"car": {"IoU": 10.0}, "person": {"IoU": 70.0}}},
        {"mIoU": 50.0, "per_class": {"car": {"IoU": 30.0}, "person": {"IoU": 60.0}}},
    ]
    assert average_scores(runs) == {"mIoU": 45.0, "per_class": {"car": {"IoU": 20.0}, "person": {"IoU": 65.0}}}
    with pytest.raises(ValueError, match="at least one"):
        average_scores([])


def test_repeated_task_networks_keep_the_first_and_average_all() -> None:
    """Fresh SegFormer-b0 networks on procedural scenes: the first of the repeats is the single
    network of the paper's protocol, the others are seeded apart, and the score is their mean."""
    train, test = make_scenes(4, size=(48, 64), seed=3), make_scenes(2, size=(48, 64), seed=3, start=10_000)
    fused = {"train": [s.a.astype(np.float32) for s in train], "test": [s.a.astype(np.float32) for s in test]}
    score = partial(downstream_miou, fused["train"], train, fused["test"], test, epochs=1, seed=3, size=(32, 32))
    single, repeated = score(), score(repeats=2)
    first, second = repeated["task_networks"]
    assert (first["seed"], second["seed"]) == (3, 3 + TASK_SEED_STRIDE)
    assert {k: v for k, v in first.items() if k != "seed"} == single
    assert repeated["mIoU"] == pytest.approx((first["mIoU"] + second["mIoU"]) / 2)
    for name, scores in repeated["per_class"].items():
        assert scores["IoU"] == pytest.approx((first["per_class"][name]["IoU"] + second["per_class"][name]["IoU"]) / 2)
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        score(repeats=0)


@pytest.mark.parametrize("task_net", ["yolov8", "segformer"])
def test_downstream_protocol_on_real_msrs_pairs(shared_data: Path, tmp_path: Path, task_net: str) -> None:
    """MSRS sample pairs; detection with its boxes, segmentation with label PNGs written here in
    MSRS's format; two 'methods' (max and mean fusion), a few epochs each."""
    root = _msrs_with_fused_methods(shared_data, tmp_path)
    out = tmp_path / "out"
    specs = [f"--method={n}:{tmp_path / n / 'train'}:{tmp_path / n / 'test'}" for n in METHODS]
    _downstream(root, task_net, "2", *specs, out=out)
    results = json.loads((out / "downstream.json").read_text())
    assert set(results) == set(METHODS)
    table = (out / "downstream.md").read_text()
    for name, result in results.items():
        assert f"| {name} |" in table
        if task_net == "yolov8":
            assert set(result) == {"mAP50", "mAP75", "per_class"} and {"person", "car"} <= set(result["per_class"])
            assert all(
                0 <= v["AP50"] <= 100 and 0 <= v["AP75"] <= v["AP50"] + 1e-9 for v in result["per_class"].values()
            )
        else:
            assert set(result["per_class"]) == {"unlabelled", "person", "curve"}
            assert 0 <= result["mIoU"] <= 100 and 0 <= result["mAcc"] <= 100
    with pytest.raises(SystemExit, match="no fused image"):
        test_only = tmp_path / "max" / "test"  # the training images are missing from it
        _downstream(root, task_net, "1", f"--method=max:{test_only}:{test_only}", out=out)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "max": np.maximum,
    "mean": lambda a, b: np.round(0.5 * a + 0.5 * b),
}
"""Two fusion 'methods' whose fused folders the MSRS tests write."""


def _msrs_with_fused_methods(shared_data: Path, tmp_path: Path) -> Path:
    """The MSRS sample copied to ``tmp_path / "MSRS"`` with segmentation labels written in MSRS's
    format (hot pixels: person; a bottom band: curve), and each of ``METHODS``' fused training and
    test folders under ``tmp_path / NAME``. Returns the data set's root."""
    root = tmp_path / "MSRS"
    for split in ("train", "test"):
        for sub in ("ir", "vi", "det_labels"):
            shutil.copytree(shared_data / "MSRS" / split / sub, root / split / sub)
        (root / split / "Segmentation_labels").mkdir()
        for ir in sorted((root / split / "ir").glob("*.png")):
            a, b = read_grey(ir), read_grey(root / split / "vi" / ir.name)
            label = np.where(a > 150, 2, 0).astype(np.uint8)  # hot pixels -> person
            label[int(0.85 * a.shape[0]) :] = 4  # a bottom band -> curve
            cv2.imwrite(str(root / split / "Segmentation_labels" / ir.name), label)
            for name, fuse in METHODS.items():
                (tmp_path / name / split).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(tmp_path / name / split / ir.name), fuse(a, b).astype(np.uint8))
    return root


def test_downstream_repeats_average_fresh_networks_seeded_alike_for_every_method(
    shared_data: Path, tmp_path: Path
) -> None:
    root = _msrs_with_fused_methods(shared_data, tmp_path)
    specs = [f"--method={n}:{tmp_path / n / 'train'}:{tmp_path / n / 'test'}" for n in METHODS]
    _downstream(root, "segformer", "1", *specs, "--repeats", "2", "--seed", "5", out=tmp_path / "two")
    _downstream(root, "segformer", "1", specs[0], "--seed", "5", out=tmp_path / "one")
    two = json.loads((tmp_path / "two" / "downstream.json").read_text())
    one = json.loads((tmp_path / "one" / "downstream.json").read_text())
    for result in two.values():
        assert [run["seed"] for run in result["task_networks"]] == [5, 1005]
        assert result["mIoU"] == pytest.approx(sum(run["mIoU"] for run in result["task_networks"]) / 2)
    first = {k: v for k, v in two["max"]["task_networks"][0].items() if k != "seed"}
    assert first == one["max"]  # the first network is the one of the paper's protocol
    assert "the mean of 2 fresh networks per method" in (tmp_path / "two" / "downstream.md").read_text()


def _downstream(root: Path, task_net: str, epochs: str, *options: str, out: Path) -> None:
    args = ["downstream", "--dataset", "msrs", "--root", str(root), "--task-net", task_net, "--epochs", epochs]
    main([*args, "--task-size", "64", "96", *options, "--out", str(out), "--quiet"])
