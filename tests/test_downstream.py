"""Downstream scores: hand-checked cases, ultralytics' matching, and the protocol on real pairs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tdfusion.cli import main
from tdfusion.downstream import confusion_matrix, detection_scores, segmentation_scores

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


@pytest.mark.parametrize("task_net", ["yolov8", "segformer"])
def test_downstream_protocol_on_real_msrs_pairs(shared_data: Path, tmp_path: Path, task_net: str) -> None:
    """MSRS sample pairs; detection with its boxes, segmentation with label PNGs written here in
    MSRS's format; two 'methods' (max and mean fusion), a few epochs each."""
    root = tmp_path / "MSRS"
    methods: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "max": np.maximum,
        "mean": lambda a, b: np.round(0.5 * a + 0.5 * b),
    }
    for split in ("train", "test"):
        for sub in ("ir", "vi", "det_labels"):
            shutil.copytree(shared_data / "MSRS" / split / sub, root / split / sub)
        (root / split / "Segmentation_labels").mkdir()
        for ir in sorted((root / split / "ir").glob("*.png")):
            a, b = read_grey(ir), read_grey(root / split / "vi" / ir.name)
            label = np.where(a > 150, 2, 0).astype(np.uint8)  # hot pixels -> person
            label[int(0.85 * a.shape[0]) :] = 4  # a bottom band -> curve
            cv2.imwrite(str(root / split / "Segmentation_labels" / ir.name), label)
            for name, fuse in methods.items():
                (tmp_path / name / split).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(tmp_path / name / split / ir.name), fuse(a, b).astype(np.uint8))
    out = tmp_path / "out"
    specs = [f"--method={n}:{tmp_path / n / 'train'}:{tmp_path / n / 'test'}" for n in methods]
    _downstream(root, task_net, "2", *specs, out=out)
    results = json.loads((out / "downstream.json").read_text())
    assert set(results) == set(methods)
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


def _downstream(root: Path, task_net: str, epochs: str, *methods: str, out: Path) -> None:
    args = ["downstream", "--dataset", "msrs", "--root", str(root), "--task-net", task_net, "--epochs", epochs]
    main([*args, "--task-size", "64", "96", *methods, "--out", str(out), "--quiet"])
