"""Paired infrared-visible data for the TDFusion example.

A data set is a list of ``Scene`` records (two grey sources on 0-255, and a label map or
boxes), read lazily from folders or generated procedurally, and a ``FusionDataset`` that
turns each into one training sample:

- ``a``, ``b``: a random ``crop x crop`` window of both sources in [0, 1] (the fusion view);
- ``task_a``, ``task_b``: both sources resized to the task network's size (the task view);
- ``mask`` (segmentation, resized nearest) and ``crop_mask`` (the labels of the fusion window),
  or ``boxes``/``classes`` (detection, normalised ``cx, cy, w, h``, which a resize leaves
  unchanged);
- on procedural scenes with segmentation labels, ``lookalikes`` and ``crop_lookalikes``: where
  the single-camera look-alikes are (``Scene.lookalikes``), in the same two views.

Folder names are matched case-insensitively: MSRS's native ``ir``/``vi``/``Segmentation_labels``
(also the released code's ``label``) and YOLO txt boxes in ``det_labels``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from metaloss.fusion.image_io import IMAGE_SUFFIXES, read_grey

from .tasks import detection_targets


@dataclass
class Scene:
    """One pair with its labels (arrays on the 0-255 scale, ``(H, W)``)."""

    name: str
    a: np.ndarray
    b: np.ndarray
    mask: np.ndarray | None = None
    boxes: np.ndarray | None = None  # (n, 4) normalised cx, cy, w, h
    classes: np.ndarray | None = None  # (n,)
    lookalikes: np.ndarray | None = None  # (H, W) uint8, procedural scenes only: 1 cold look-alike, 2 hot seam

    def label_mask(self) -> np.ndarray:
        """The segmentation labels; a clear error for a scene that has none."""
        if self.mask is None:
            raise ValueError(f"scene {self.name!r} has no segmentation label image")
        return self.mask


@dataclass(frozen=True)
class PairFiles:
    """Where one pair and its labels live on disk."""

    name: str
    a: Path
    b: Path
    mask: Path | None = None
    boxes: Path | None = None


def find_dir(root: Path, *names: str) -> Path | None:
    """The sub-folder of ``root`` whose name is one of ``names``, case-insensitively."""
    if not root.is_dir():
        return None
    wanted = {n.lower() for n in names}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def find_image(folder: Path, stem: str) -> Path | None:
    """The image called ``stem`` (any of the known suffixes) in ``folder``, or ``None``."""
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def paired_files(
    a_dir: Path, b_dir: Path, mask_dir: Path | None = None, box_dir: Path | None = None, strict: bool = True
) -> list[PairFiles]:
    """Pairs of two folders matched by file stem.

    Args:
        a_dir, b_dir: the two sources' folders.
        mask_dir: label maps of the same stems (optional).
        box_dir: YOLO txt box files of the same stems (optional).
        strict: a source without its partner is an error. ``False`` keeps it as a pair whose
            missing partner is the path where it was looked for (which does not exist), so that a
            check (``datasets.check_pairs``) can name it together with every other problem.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: (``strict``) a source has no partner (each offending file is named).
    """
    for folder in (a_dir, b_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {folder}")
    a_files, b_files = _images(a_dir), _images(b_dir)
    lonely = sorted(set(a_files) ^ set(b_files))
    if lonely and strict:
        missing = [str(a_files[n]) for n in lonely if n in a_files] + [str(b_files[n]) for n in lonely if n in b_files]
        raise ValueError("sources without their partner:\n  " + "\n  ".join(missing))
    for name in lonely:  # not strict: the partner is where it was looked for
        if name in a_files:
            b_files[name] = b_dir / a_files[name].name
        else:
            a_files[name] = a_dir / b_files[name].name
    masks = _images(mask_dir) if mask_dir else {}
    pairs = []
    for name in sorted(a_files):
        box = box_dir / f"{name}.txt" if box_dir else None
        pairs.append(
            PairFiles(name, a_files[name], b_files[name], masks.get(name), box if box and box.is_file() else None)
        )
    return pairs


def read_yolo_boxes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """YOLO txt: one ``class cx cy w h`` (normalised) per line -> boxes ``(n, 4)``, classes ``(n,)``."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if len(row) != 5:
            raise ValueError(f"{path}:{i + 1}: expected 'class cx cy w h', got {' '.join(row)!r}")
    data = np.array(rows, dtype=np.float32).reshape(-1, 5)
    return data[:, 1:], data[:, 0].astype(np.int64)


def load_scene(files: PairFiles, classes: tuple[str, ...] = ()) -> Scene:
    """Read a pair as the reference pipeline does (OpenCV grey, rounded); VOC XML boxes need ``classes``."""
    a, b = read_grey(files.a), read_grey(files.b)
    if a.shape != b.shape:
        raise ValueError(f"{files.a} is {a.shape[1]}x{a.shape[0]} but {files.b} is {b.shape[1]}x{b.shape[0]}")
    scene = Scene(files.name, a, b)
    if files.mask is not None:
        mask = cv2.imread(str(files.mask), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            raise ValueError(f"{files.mask} is not a single-channel label image")
        scene.mask = mask.astype(np.int64)
    if files.boxes is not None:
        if files.boxes.suffix.lower() == ".xml":
            from .datasets import read_voc  # (a module-level import would be circular)

            scene.boxes, scene.classes = read_voc(files.boxes, classes, a.shape)
        else:
            scene.boxes, scene.classes = read_yolo_boxes(files.boxes)
    return scene


class SceneList(Sequence[Scene]):
    """Scenes read lazily from ``PairFiles`` and kept once read."""

    def __init__(self, files: Sequence[PairFiles], classes: tuple[str, ...] = ()) -> None:
        self.files = list(files)
        self._load = functools.lru_cache(maxsize=None)(lambda i: load_scene(self.files[i], classes))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Scene:  # type: ignore[override]
        return self._load(i)


class FusionDataset(Dataset[dict[str, Any]]):
    """Training samples: random crops for the fusion loss, resized views for the task.

    Args:
        scenes: the records.
        kind: ``"seg"`` or ``"det"`` (which labels a sample carries), or ``None``: no labels
            (fusion alone, or a task objective that needs none, such as an image-quality measure).
        crop: side of the fusion crop (clipped to the image).
        task_size: ``(H, W)`` of the task view.
        train: random crops (``False``: the centre crop).
        flip: random horizontal flips of the whole pair (labels and boxes follow).
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        kind: str | None,
        crop: int = 256,
        task_size: tuple[int, int] = (240, 320),
        train: bool = True,
        flip: bool = False,
    ) -> None:
        if kind not in ("seg", "det", None):
            raise ValueError(f"kind must be 'seg', 'det' or None, got {kind!r}")
        self.scenes, self.kind, self.crop, self.task_size, self.train, self.flip = (
            scenes,
            kind,
            crop,
            task_size,
            train,
            flip,
        )

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.scenes[i]
        full = torch.from_numpy(np.stack([scene.a, scene.b]) / 255.0).float()  # (2, H, W)
        mask_np, lookalikes, boxes = scene.mask, scene.lookalikes, scene.boxes
        if self.flip and bool(torch.rand(()) < 0.5):
            full = full.flip(-1)
            mask_np = None if mask_np is None else np.ascontiguousarray(mask_np[:, ::-1])
            lookalikes = None if lookalikes is None else np.ascontiguousarray(lookalikes[:, ::-1])
            if boxes is not None:
                boxes = boxes.copy()
                boxes[:, 0] = 1.0 - boxes[:, 0]  # normalised cx mirrors; w, h, cy do not change
        h, w = full.shape[-2:]
        c = min(self.crop, h, w)
        if self.train:
            y = int(torch.randint(0, h - c + 1, ()).item())
            x = int(torch.randint(0, w - c + 1, ()).item())
        else:
            y, x = (h - c) // 2, (w - c) // 2
        window = full[:, y : y + c, x : x + c]
        task = F.interpolate(full[None], size=self.task_size, mode="bilinear", align_corners=False)[0]
        sample: dict[str, Any] = {
            "name": scene.name,
            "a": window[:1],
            "b": window[1:],
            "task_a": task[:1],
            "task_b": task[1:],
        }
        if self.kind == "seg":
            if mask_np is None:
                raise ValueError(f"scene {scene.name} has no label map for segmentation")
            sample["crop_mask"], sample["mask"] = self._label_views(mask_np, y, x, c)
            if lookalikes is not None:  # procedural scenes: where the look-alikes are, for the study
                sample["crop_lookalikes"], sample["lookalikes"] = self._label_views(lookalikes, y, x, c)
        elif self.kind == "det":
            boxes = boxes if boxes is not None else np.zeros((0, 4), np.float32)
            classes = scene.classes if scene.classes is not None else np.zeros((0,), np.int64)
            sample["boxes"], sample["classes"] = torch.from_numpy(boxes).float(), torch.from_numpy(classes)
        return sample

    def _label_views(self, labels: np.ndarray, y: int, x: int, c: int) -> tuple[Tensor, Tensor]:
        """A label map's fusion window ``(c, c)`` and its task view (resized nearest), as ``long``."""
        window = torch.from_numpy(np.ascontiguousarray(labels[y : y + c, x : x + c])).long()
        full = torch.from_numpy(np.ascontiguousarray(labels))[None, None].float()
        return window, F.interpolate(full, size=self.task_size, mode="nearest")[0, 0].long()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into one batch (detection targets in ultralytics' format)."""
    batch: dict[str, Any] = {"name": [s["name"] for s in samples]}
    for key in ("a", "b", "task_a", "task_b", "mask", "crop_mask", "lookalikes", "crop_lookalikes"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "boxes" in samples[0]:
        batch["det"] = detection_targets([s["boxes"] for s in samples], [s["classes"] for s in samples])
    return batch


def collate_swapped(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate``, with the batch doubled by the (B, A)-swapped copies (the released code's
    ``Switch``): the fusion network learns to be symmetric in its two inputs."""
    # The window's labels are dropped: the same pixels have the other source first once swapped.
    samples = [{k: v for k, v in s.items() if k not in ("crop_mask", "crop_lookalikes")} for s in samples]
    swapped = [{**s, "a": s["b"], "b": s["a"], "task_a": s["task_b"], "task_b": s["task_a"]} for s in samples]
    return collate(samples + swapped)


def to_unit(image: np.ndarray) -> Tensor:
    """A 0-255 ``(H, W)`` array as a ``(1, 1, H, W)`` float tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image) / 255.0).float()[None, None]
