"""MSRS, FMB, M3FD, LLVIP and plain paired folders, in their native layouts, with the paper's splits.

=========  ====================================================  =================================
data set   native layout (folder names matched case-insensitively)  split (paper)
=========  ====================================================  =================================
MSRS       ``{train,test}/{ir,vi,Segmentation_labels}`` (+``det_labels`` YOLO txt)   as released
FMB        ``{train,test}/{Infrared,Visible,Label}``                                 as released
M3FD       ``M3FD_Detection/{Ir,Vis,Annotation}`` (VOC XML), ``M3FD_Fusion/{Ir,Vis}``  3150 / 1050, the
                                                                                      300 fusion pairs in test
LLVIP      ``{infrared,visible}/{train,test}``, ``Annotations`` (VOC XML)             every 10th image
=========  ====================================================  =================================

The released code's renamed folders (``ir``, ``vi``, ``label``) are accepted too. Generated
splits are deterministic and written as plain name lists (``train.txt``, ``test.txt``) that the
user can read, edit and pass back with ``--split-dir``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm.auto import tqdm

from metaloss.fusion.image_io import read_bgr

from .data import PairFiles, find_dir, paired_files, read_yolo_boxes

CLASSES: dict[str, tuple[str, ...]] = {
    "msrs": ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump"),
    "msrs_det": ("person", "bicycle", "car"),  # the third-party box labels of the MSRS sample
    "fmb": (
        "background",
        "road",
        "sidewalk",
        "building",
        "lamp",
        "sign",
        "vegetation",
        "sky",
        "person",
        "car",
        "truck",
        "bus",
        "motorcycle",
        "bicycle",
        "pole",
    ),
    "m3fd": ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck"),
    "llvip": ("person",),
}


def _require(folder: Path | None, where: Path, names: str) -> Path:
    if folder is None:
        raise FileNotFoundError(f"missing folder {where}/{names}")
    return folder


def _split_folder(root: Path, split: str) -> Path:
    return _require(find_dir(root, split), root, split)


def msrs_files(root: str | Path, split: str, strict: bool = True) -> list[PairFiles]:
    """MSRS: ``{split}/{ir,vi}`` with ``Segmentation_labels`` (or ``label``) and ``det_labels``."""
    base = _split_folder(Path(root), split)
    a = _require(find_dir(base, "ir", "infrared"), base, "ir")
    b = _require(find_dir(base, "vi", "visible"), base, "vi")
    labels = find_dir(base, "Segmentation_labels", "label", "labels")
    return paired_files(a, b, labels, find_dir(base, "det_labels"), strict=strict)


def fmb_files(root: str | Path, split: str, strict: bool = True) -> list[PairFiles]:
    """FMB: ``{split}/{Infrared,Visible,Label}`` (or ``ir``, ``vi``, ``label``)."""
    base = _split_folder(Path(root), split)
    a = _require(find_dir(base, "Infrared", "ir"), base, "Infrared")
    b = _require(find_dir(base, "Visible", "vi"), base, "Visible")
    return paired_files(a, b, find_dir(base, "Label", "label", "labels"), strict=strict)


def _voc(pairs: list[PairFiles], annotations: Path | None) -> list[PairFiles]:
    if annotations is None:
        return pairs
    return [
        PairFiles(
            p.name, p.a, p.b, None, annotations / f"{p.name}.xml" if (annotations / f"{p.name}.xml").is_file() else None
        )
        for p in pairs
    ]


def read_split(path: Path) -> list[str]:
    """A split file: one name per line (blank lines and ``#`` comments ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"no split file at {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def write_split(path: Path, names: list[str], comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + "\n".join(names) + "\n")


def m3fd_split(
    names: list[str], fusion_names: set[str], seed: int = 0, test_fraction: float = 0.25
) -> dict[str, list[str]]:
    """The paper's M3FD split: a quarter for test (3150 train / 1050 test of 4200), the fusion
    pairs all inside test.

    The rest of the test part is drawn with a fixed seed, so the split is the same every time.
    """
    names = sorted(names)
    rest = [n for n in names if n not in fusion_names]
    rng = np.random.default_rng(seed)
    extra = max(0, round(test_fraction * len(names)) - len(fusion_names & set(names)))
    chosen = set(rng.permutation(rest)[:extra].tolist())
    test = sorted((fusion_names & set(names)) | chosen)
    return {"train": [n for n in names if n not in set(test)], "test": test}


def m3fd_files(root: str | Path, split: str, split_dir: Path | None = None, strict: bool = True) -> list[PairFiles]:
    """M3FD: ``M3FD_Detection/{Ir,Vis,Annotation}``; split by ``m3fd_split`` or a split file."""
    root = Path(root)
    det = find_dir(root, "M3FD_Detection") or root
    a = _require(find_dir(det, "Ir", "ir"), det, "Ir")
    b = _require(find_dir(det, "Vis", "vi"), det, "Vis")
    pairs = _voc(paired_files(a, b, strict=strict), find_dir(det, "Annotation", "Annotations", "label"))
    if split_dir is not None and (split_dir / f"{split}.txt").is_file():
        keep = set(read_split(split_dir / f"{split}.txt"))
    else:
        fusion = find_dir(root, "M3FD_Fusion")
        fusion_ir = find_dir(fusion, "Ir", "ir") if fusion else None
        fusion_names = {p.stem for p in fusion_ir.iterdir()} if fusion_ir else set()
        keep = set(m3fd_split([p.name for p in pairs], fusion_names)[split])
    return [p for p in pairs if p.name in keep]


def llvip_files(root: str | Path, split: str, every: int = 10, strict: bool = True) -> list[PairFiles]:
    """LLVIP: ``{infrared,visible}/{split}``, VOC XML in ``Annotations``; every 10th image (paper)."""
    root = Path(root)
    ir = _require(find_dir(root, "infrared", "ir"), root, "infrared")
    vi = _require(find_dir(root, "visible", "vi"), root, "visible")
    pairs = paired_files(_split_folder(ir, split), _split_folder(vi, split), strict=strict)
    return _voc(pairs[::every], find_dir(root, "Annotations", "Annotation"))


def folder_files(a: str | Path, b: str | Path, strict: bool = True) -> list[PairFiles]:
    """Any two folders of matching names (TNO, RoadScene, medical pairs, multi-exposure...)."""
    return paired_files(Path(a), Path(b), strict=strict)


def read_voc(path: Path, classes: tuple[str, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """VOC XML -> normalised ``(cx, cy, w, h)`` boxes and class ids.

    Args:
        path: the XML file.
        classes: the data set's class names (matched case-insensitively).
        size: ``(H, W)`` of the image, used when the XML has no size.

    Raises:
        ValueError: an unknown class or a box outside the image (the file is named).
    """
    lower = [c.lower() for c in classes]
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not valid XML ({err})") from err
    h, w = size
    boxes, ids = [], []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name.lower() not in lower:
            raise ValueError(f"{path}: class {name!r} is not one of {list(classes)}")
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"{path}: box ({x0}, {y0}, {x1}, {y1}) is outside the {w}x{h} image")
        boxes.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        ids.append(lower.index(name.lower()))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(ids, np.int64)


@dataclass
class SplitReport:
    """What ``check-data`` found in one split."""

    pairs: int = 0
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    pixels: Counter[int] = field(default_factory=Counter)  # label-map pixels per class id
    boxes: Counter[int] = field(default_factory=Counter)  # boxes per class id
    problems: list[str] = field(default_factory=list)


def _without_partner(pair: PairFiles) -> str | None:
    """The problem of a pair whose one source exists and the other not (``paired_files(strict=False)``)."""
    for have, partner in ((pair.a, pair.b), (pair.b, pair.a)):
        if have.is_file() and not partner.is_file():
            return f"{have} has no partner (no {partner.parent}/{pair.name}.*)"
    return None


def check_pairs(
    pairs: list[PairFiles],
    classes: tuple[str, ...],
    box_classes: tuple[str, ...] | None = None,
    progress: bool = False,
    need: Literal["seg", "det"] | None = None,
) -> SplitReport:
    """Read every pair and label; collect sizes, class counts and each offending file.

    Args:
        pairs: the split's pairs.
        classes: the label maps' classes.
        box_classes: the boxes' classes (default: ``classes``).
        progress: show a progress bar.
        need: the labels the task needs: ``"seg"`` (a label map for every pair; box files are
            then not read) or ``"det"`` (box files; a pair without one is a background image, as
            in YOLO's convention, but a split without any is a problem). ``None``: fusion only,
            every label present is checked.
    """
    box_classes = classes if box_classes is None else box_classes
    report = SplitReport(pairs=len(pairs))
    lonely = {p.name: problem for p in pairs if (problem := _without_partner(p))}
    if need == "seg":
        report.problems += [
            f"{p.a}: no label map for segmentation (pair {p.name})"
            for p in pairs
            if p.mask is None and p.name not in lonely  # a lonely source is named once, below
        ]
    if need == "det" and pairs and all(p.boxes is None for p in pairs):
        report.problems.append(f"no pair has a box file for detection (the first is {pairs[0].a})")
    for p in tqdm(pairs, desc="check", disable=not progress, leave=False):
        if p.name in lonely:
            report.problems.append(lonely[p.name])
            continue
        try:
            a, b = read_bgr(p.a), read_bgr(p.b)
        except (ValueError, FileNotFoundError) as err:
            report.problems.append(str(err))
            continue
        if a.shape[:2] != b.shape[:2]:
            report.problems.append(f"{p.a} is {a.shape[1]}x{a.shape[0]} but {p.b} is {b.shape[1]}x{b.shape[0]}")
            continue
        h, w = a.shape[:2]
        report.sizes[(w, h)] += 1
        if p.mask is not None:
            mask = cv2.imread(str(p.mask), cv2.IMREAD_UNCHANGED)
            if mask is None or mask.ndim != 2:
                report.problems.append(f"{p.mask} is not a single-channel label image")
            elif mask.shape != (h, w):
                report.problems.append(f"{p.mask} is {mask.shape[1]}x{mask.shape[0]}, the pair is {w}x{h}")
            else:
                ids, counts = np.unique(mask, return_counts=True)
                bad = [int(i) for i in ids if i >= len(classes) and i != 255]
                if bad:
                    report.problems.append(f"{p.mask}: label ids {bad} are outside the {len(classes)} classes")
                report.pixels.update({int(i): int(c) for i, c in zip(ids, counts) if i < len(classes)})
        if p.boxes is not None and need != "seg":
            try:
                if p.boxes.suffix == ".xml":
                    _, ids = read_voc(p.boxes, box_classes, (h, w))
                else:
                    boxes, ids = read_yolo_boxes(p.boxes)
                    outside = (boxes[:, :2] - boxes[:, 2:] / 2 < -1e-6).any() or (
                        boxes[:, :2] + boxes[:, 2:] / 2 > 1 + 1e-6
                    ).any()
                    if len(boxes) and outside:
                        raise ValueError(f"{p.boxes}: a box is outside the image")
                    if len(ids) and (ids.max() >= len(box_classes) or ids.min() < 0):
                        raise ValueError(
                            f"{p.boxes}: class ids {sorted(set(ids.tolist()))} outside the {len(box_classes)} classes"
                        )
                report.boxes.update(ids.tolist())
            except ValueError as err:
                report.problems.append(str(err))
    if not pairs:
        report.problems.append("the split is empty")
    return report
