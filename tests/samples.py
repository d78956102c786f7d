"""Small data-set trees built from the real sample pairs in ``../shared/data``, for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from metaloss.fusion.image_io import read_bgr, read_grey


def msrs_tree(shared_data: Path, tmp_path: Path, splits: dict[str, list[str]]) -> Path:
    """An MSRS tree in the native layout, ``{split: [pair names]}``, with label PNGs written here
    (uint8 class ids: hot regions person (2), a road band curve (4)); no MSRS label maps were
    available to ship (``../shared/data/README.md``)."""
    root = tmp_path / "MSRS"
    for split, names in splits.items():
        for sub in ("ir", "vi", "det_labels", "Segmentation_labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            for sub, suffix in (("ir", ".png"), ("vi", ".png"), ("det_labels", ".txt")):
                shutil.copy(shared_data / "MSRS" / split / sub / f"{name}{suffix}", root / split / sub)
            ir = read_grey(root / split / "ir" / f"{name}.png")
            mask = np.zeros(ir.shape, np.uint8)
            mask[ir > 150] = 2
            mask[int(0.8 * ir.shape[0]) :, :] = 4
            cv2.imwrite(str(root / split / "Segmentation_labels" / f"{name}.png"), mask)
    return root


def downsized_pairs(source_a: Path, source_b: Path, tmp_path: Path, side: int = 96) -> tuple[Path, Path]:
    """Copies of two folders of paired images, shrunk so their longer side is ``side`` pixels."""
    out = []
    for folder in (source_a, source_b):
        target = tmp_path / folder.name
        target.mkdir(parents=True)
        for path in sorted(folder.iterdir()):
            image = read_bgr(path)
            scale = side / max(image.shape[:2])
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            cv2.imwrite(str(target / f"{path.stem}.png"), cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        out.append(target)
    return out[0], out[1]
