"""Data sets in their native layouts, the paper's splits, check-data, boxes through transforms."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tdfusion.datasets as ds
import torch
from tdfusion.cli import main
from tdfusion.data import FusionDataset, Scene, SceneList, collate, collate_swapped

VOC = """<annotation><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"""
OBJ = "<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"  # noqa: E501


def _img(path: Path, h: int = 32, w: int = 40, value: int = 100, colour: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((h, w, 3) if colour else (h, w), value, np.uint8)
    cv2.imwrite(str(path), image)


def _msrs_sample(root: Path, pairs: int, boxes: bool = False) -> None:
    """A small MSRS tree written here: grey infrared, colour visible, label maps (class 2) and,
    with ``boxes``, one YOLO box per pair; both splits."""
    for split in ("train", "test"):
        for i in range(pairs):
            name = f"0000{i}N"
            _img(root / split / "ir" / f"{name}.png")
            _img(root / split / "vi" / f"{name}.png", colour=True)
            _img(root / split / "Segmentation_labels" / f"{name}.png", value=2)
            if boxes:
                (root / split / "det_labels").mkdir(exist_ok=True)
                (root / split / "det_labels" / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")


def _check(capsys, *args: str) -> tuple[int, str]:
    try:
        main(["check-data", "--quiet", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_real_samples_pass_check_data(shared_data: Path, capsys) -> None:
    for args in (
        ("--dataset", "msrs", "--root", str(shared_data / "MSRS"), "--task-net", "yolov8"),
        ("--dataset", "folders", "--a", str(shared_data / "TNO/ir"), "--b", str(shared_data / "TNO/vi")),
    ):
        code, out = _check(capsys, *args)
        assert code == 0, out
        assert "pairs" in out and out.strip().endswith("ok")


def test_msrs_and_llvip_samples_load(shared_data: Path) -> None:
    msrs = ds.msrs_files(shared_data / "MSRS", "test")
    assert len(msrs) == 20 and all(p.boxes is not None for p in msrs)
    llvip = ds.llvip_files(shared_data / "LLVIP", "test")
    assert [p.name for p in llvip] == sorted(p.stem for p in (shared_data / "LLVIP/infrared/test").iterdir())[::10]
    scene = SceneList(llvip, ds.CLASSES["llvip"])[0]
    assert scene.a.shape == scene.b.shape == (1024, 1280)  # IR stored as 3 identical channels reads as grey
    assert scene.boxes is not None and len(scene.boxes) > 0 and scene.boxes.max() <= 1


def test_native_names_are_case_insensitive_and_renamed_layout_works(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _img(tmp_path / "fmb" / split / "INFRARED" / "00001.png")
        _img(tmp_path / "fmb" / split / "visible" / "00001.png", colour=True)
        _img(tmp_path / "fmb" / split / "Label" / "00001.png", value=3)
        _img(tmp_path / "renamed" / split / "ir" / "00001.png")
        _img(tmp_path / "renamed" / split / "vi" / "00001.png")
        _img(tmp_path / "renamed" / split / "label" / "00001.png", value=14)
    for root in ("fmb", "renamed"):
        files = ds.fmb_files(tmp_path / root, "train")
        assert len(files) == 1 and files[0].mask is not None
        report = ds.check_pairs(files, ds.CLASSES["fmb"])
        assert not report.problems and report.sizes == {(40, 32): 1}


def test_m3fd_split_is_deterministic_and_holds_the_fusion_pairs(tmp_path: Path) -> None:
    names = [f"{i:05d}" for i in range(4200)]
    fusion = set(names[100:400])
    split = ds.m3fd_split(names, fusion)
    assert len(split["train"]) == 3150 and len(split["test"]) == 1050
    assert fusion <= set(split["test"]) and not set(split["train"]) & set(split["test"])
    assert ds.m3fd_split(names, fusion) == split
    ds.write_split(tmp_path / "test.txt", split["test"], "m3fd test")
    assert ds.read_split(tmp_path / "test.txt") == split["test"]


def _m3fd_tree(root: Path) -> None:
    det = root / "M3FD_Detection"
    for i in range(8):
        name = f"{i:05d}"
        _img(det / "Ir" / f"{name}.png", 48, 64)
        _img(det / "Vis" / f"{name}.png", 48, 64, colour=True)
        (det / "Annotation").mkdir(parents=True, exist_ok=True)
        (det / "Annotation" / f"{name}.xml").write_text(
            VOC.format(
                w=64,
                h=48,
                objects=OBJ.format(name="People", x0=4, y0=6, x1=20, y1=40)
                + OBJ.format(name="car", x0=30, y0=10, x1=60, y1=30),
            )
        )
    _img(root / "M3FD_Fusion" / "Ir" / "00003.png", 48, 64)


def test_m3fd_native_layout_and_voc_boxes(tmp_path: Path, capsys) -> None:
    _m3fd_tree(tmp_path)
    test = ds.m3fd_files(tmp_path, "test")
    assert "00003" in [p.name for p in test]
    scene = SceneList(test, ds.CLASSES["m3fd"])[0]
    assert scene.boxes is not None and scene.classes is not None
    np.testing.assert_allclose(scene.boxes[0], [12 / 64, 23 / 48, 16 / 64, 34 / 48])
    assert scene.classes.tolist() == [0, 1]  # 'car' matches 'Car'
    code, out = _check(capsys, "--dataset", "m3fd", "--root", str(tmp_path), "--write-splits", str(tmp_path / "splits"))
    assert code == 0, out
    assert "[train] 6 pairs" in out and "[test] 2 pairs" in out and "People: 6, Car: 6" in out
    assert (tmp_path / "splits" / "train.txt").is_file()


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("lonely", "has no partner"),
        ("size", "but"),
        ("truncated", "truncated"),
        ("unreadable", "not a readable image"),
        ("label_id", "outside the 9 classes"),
        ("box", "outside the"),
        ("empty", "no images|empty"),
        ("missing", "missing folder"),
    ],
)
def test_check_data_names_each_offending_file(tmp_path: Path, capsys, breakage: str, expected: str) -> None:
    root = tmp_path / "MSRS"
    _msrs_sample(root, pairs=2, boxes=True)
    bad = root / "test"
    culprit = ""
    if breakage == "lonely":
        culprit = str(bad / "ir" / "00009N.png")
        _img(Path(culprit))
    elif breakage == "size":
        _img(bad / "vi" / "00001N.png", 30, 40)
        culprit = "00001N.png"
    elif breakage == "truncated":
        cv2.imwrite(str(bad / "ir" / "00002N.jpg"), np.full((32, 40), 90, np.uint8))
        cv2.imwrite(str(bad / "vi" / "00002N.jpg"), np.full((32, 40), 90, np.uint8))
        data = (bad / "ir" / "00002N.jpg").read_bytes()
        (bad / "ir" / "00002N.jpg").write_bytes(data[: len(data) - 20])
        culprit = "00002N.jpg"
    elif breakage == "unreadable":
        (bad / "vi" / "00000N.png").write_bytes(b"not an image")
        culprit = str(bad / "vi" / "00000N.png")
    elif breakage == "label_id":
        _img(bad / "Segmentation_labels" / "00001N.png", value=12)
        culprit = "00001N.png"
    elif breakage == "box":
        (bad / "det_labels" / "00000N.txt").write_text("1 0.95 0.5 0.3 0.2\n")
        culprit = "00000N.txt"
    elif breakage == "empty":
        for sub in ("ir", "vi"):
            for f in (bad / sub).iterdir():
                f.unlink()
        culprit = "test"
    elif breakage == "missing":
        for f in (bad / "vi").iterdir():
            f.unlink()
        (bad / "vi").rmdir()
        culprit = "vi"
    code, out = _check(capsys, "--dataset", "msrs", "--root", str(root), "--task-net", "yolov8")
    assert code == 1, out
    assert culprit in out
    import re

    assert re.search(expected, out), out


def test_check_data_lists_a_lonely_source_with_every_other_kind_of_problem(tmp_path: Path, capsys) -> None:
    """One run names them all: a source without its partner no longer hides the other problems."""
    root = tmp_path / "MSRS"
    _msrs_sample(root, pairs=3)
    bad = root / "train"
    _img(bad / "vi" / "00007N.png")  # no infrared partner
    _img(bad / "Segmentation_labels" / "00001N.png", value=12)  # an id outside the 9 classes
    _img(bad / "vi" / "00002N.png", 30, 40)  # sizes differ
    code, out = _check(capsys, "--dataset", "msrs", "--root", str(root))
    assert code == 1
    assert f"{bad / 'vi' / '00007N.png'} has no partner" in out
    assert "00001N.png: label ids [12]" in out
    assert "00002N.png is 40x30" in out
    assert "3 problem(s)" in out


def test_boxes_frame_the_same_pixels_after_flip_and_resize() -> None:
    h, w = 60, 80
    a = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = 10, 20, 30, 50  # a bright object at known pixels
    a[y0:y1, x0:x1] = 255
    box = np.array([[(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]], np.float32)
    scene = Scene("s", a, a.copy(), boxes=box, classes=np.array([0]))
    data = FusionDataset([scene], "det", crop=32, task_size=(30, 40), flip=True)
    seen_flip = set()
    for seed in range(8):
        torch.manual_seed(seed)
        sample = data[0]
        image = sample["task_a"][0].numpy()
        cx, cy, bw, bh = sample["boxes"][0].tolist()
        th, tw = image.shape
        left, right = round((cx - bw / 2) * tw), round((cx + bw / 2) * tw)
        top, bottom = round((cy - bh / 2) * th), round((cy + bh / 2) * th)
        inside = image[top:bottom, left:right]
        outside = image.copy()
        outside[top:bottom, left:right] = 0
        assert inside.mean() > 0.9 and outside.max() < 0.6, (seed, cx)
        seen_flip.add(cx < 0.5)
    assert seen_flip == {True, False}, "the flip never (or always) happened"
    batch = collate([data[0], data[0]])
    assert batch["det"]["batch_idx"].tolist() == [0.0, 1.0] and batch["det"]["bboxes"].shape == (2, 4)


def test_check_data_checks_what_the_task_needs_and_train_runs_it_first(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped MSRS sample has boxes but no label maps: fine for YOLOv8, not for SegFormer,
    and `train` says so before it starts instead of failing inside a data-loader worker."""
    msrs = str(shared_data / "MSRS")
    code, out = _check(capsys, "--dataset", "msrs", "--root", msrs, "--task-net", "yolov8")
    assert code == 0, out
    code, out = _check(capsys, "--dataset", "msrs", "--root", msrs)  # default: segmentation
    assert code == 1 and "no label map for segmentation" in out and "00001D" in out, out
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match="no label map for segmentation"):
        main(["train", "--dataset", "msrs", "--root", msrs, "--out", str(out_dir), "--quiet"])
    assert not (out_dir / "last.pt").exists() and not (out_dir / "logs").exists()
    # The LLVIP sample's training split holds no annotation file: detection has nothing to learn.
    code, out = _check(capsys, "--dataset", "llvip", "--root", str(shared_data / "LLVIP"))
    problems = out.split("problem(s):")[-1]
    assert code == 1 and "[train] no pair has a box file for detection" in problems and "[test]" not in problems


def test_label_maps_frame_the_same_pixels_after_flip_crop_and_resize() -> None:
    """``mask`` and ``lookalikes`` (and their fusion windows) cover the pixels they label in both views."""
    h, w = 60, 80
    a = np.zeros((h, w), np.float32)
    a[20:50, 10:30] = 255  # a labelled object
    b = np.zeros((h, w), np.float32)
    b[6:26, 50:70] = 255  # a look-alike, seen in b only (even edges: the 2x resize keeps them sharp)
    mask = np.zeros((h, w), np.int64)
    mask[20:50, 10:30] = 1
    lookalikes = np.zeros((h, w), np.uint8)
    lookalikes[6:26, 50:70] = 1
    data = FusionDataset([Scene("s", a, b, mask, lookalikes=lookalikes)], "seg", crop=32, task_size=(30, 40), flip=True)
    seen_flip = set()
    for seed in range(8):
        torch.manual_seed(seed)
        sample = data[0]
        for labels, image, crop_labels, crop_image in (
            (sample["mask"], sample["task_a"], sample["crop_mask"], sample["a"]),
            (sample["lookalikes"], sample["task_b"], sample["crop_lookalikes"], sample["b"]),
        ):
            assert labels.dtype == crop_labels.dtype == torch.long
            np.testing.assert_array_equal((image[0] > 0.5).numpy(), (labels == 1).numpy())
            np.testing.assert_array_equal((crop_image[0] > 0.5).numpy(), (crop_labels == 1).numpy())
        seen_flip.add(bool(sample["mask"][:, :20].any()))
    assert seen_flip == {True, False}, "the flip never (or always) happened"
    batch = collate([data[0], data[0]])
    assert batch["lookalikes"].shape == (2, 30, 40) and batch["crop_lookalikes"].shape == (2, 32, 32)
    swapped = collate_swapped([data[0]])
    assert "crop_lookalikes" not in swapped and swapped["lookalikes"].shape == (2, 30, 40)
