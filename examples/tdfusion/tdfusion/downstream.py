"""Downstream evaluation: how well a task network does on a fusion method's images.

- Segmentation: mIoU and mAcc, overall and per class, from a confusion matrix (the layout of the
  paper's Tables S-1 and S-2).
- Detection: mAP50 and mAP75, overall and per class (Table S-3), with ultralytics' own metric
  code: its NMS, its validator's prediction-to-label matching at IoU 0.50:0.95, and
  ``ap_per_class``.

The paper's protocol (section 4.3) is ``train_and_evaluate``: train a fresh task network on a
method's fused training images, evaluate it on its fused test images. ``fresh_task_scores`` repeats
it with several fresh task networks and averages their scores, since one network's initialisation
moves a score by several points (docs/learned-loss-study.md, section 16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .data import Scene, collate, to_unit
from .tasks import Task


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(C, C)`` counts, rows = true class, columns = predicted class (``ignore_index`` skipped)."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = num_classes * target[keep].astype(np.int64) + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """mIoU and mAcc (in %) over the classes present in the labels, and per class."""
    tp = np.diag(conf).astype(np.float64)
    gt, pred = conf.sum(1).astype(np.float64), conf.sum(0).astype(np.float64)
    iou = tp / np.maximum(gt + pred - tp, 1)
    acc = tp / np.maximum(gt, 1)
    present = gt > 0
    return {
        "mIoU": 100 * float(iou[present].mean()) if present.any() else float("nan"),
        "mAcc": 100 * float(acc[present].mean()) if present.any() else float("nan"),
        "per_class": {
            n: {"IoU": 100 * float(iou[i]), "Acc": 100 * float(acc[i])} for i, n in enumerate(names) if present[i]
        },
    }


def _match(pred_cls: Tensor, true_cls: Tensor, iou: Tensor) -> np.ndarray:
    """ultralytics' validator matching at IoU 0.50:0.95 (its ``BaseValidator.match_predictions``)."""
    from ultralytics.engine.validator import BaseValidator

    holder = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    correct = BaseValidator.match_predictions(holder, pred_cls, true_cls, iou)  # type: ignore[arg-type]
    return correct.cpu().numpy()


def detection_scores(
    predictions: Sequence[Tensor],
    targets: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    size: tuple[int, int],
) -> dict[str, Any]:
    """mAP50 and mAP75 (in %), overall and per class.

    Args:
        predictions: per image ``(n, 6)`` ``[x1, y1, x2, y2, conf, cls]`` in pixels of ``size``.
        targets: per image ``(boxes (m, 4) normalised cx, cy, w, h; classes (m,))``.
        names: class names.
        size: ``(H, W)`` of the images the predictions refer to.
    """
    from ultralytics.utils.metrics import ap_per_class, box_iou
    from ultralytics.utils.ops import xywh2xyxy

    h, w = size
    tps, confs, pcls, tcls = [], [], [], []
    for det, (boxes, classes) in zip(predictions, targets):
        true_cls = torch.as_tensor(classes, dtype=torch.float32)
        tcls.append(true_cls.numpy())
        if len(det) == 0:
            continue
        if len(classes):
            true_xyxy = xywh2xyxy(torch.as_tensor(boxes, dtype=torch.float32) * torch.tensor([w, h, w, h]))
            tps.append(_match(det[:, 5], true_cls, box_iou(true_xyxy, det[:, :4])))
        else:
            tps.append(np.zeros((len(det), 10), bool))
        confs.append(det[:, 4].numpy())
        pcls.append(det[:, 5].numpy())
    target_cls = np.concatenate(tcls) if tcls else np.zeros(0)
    if not tps:
        ap = np.zeros((0, 10))
        present = np.zeros(0, int)
    else:
        results = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), target_cls)
        ap, present = results[5], results[6]
    per_class = {
        names[int(c)]: {"AP50": 100 * float(ap[i, 0]), "AP75": 100 * float(ap[i, 5])} for i, c in enumerate(present)
    }
    for c in np.unique(target_cls).astype(int):  # labelled classes that were never predicted score 0
        per_class.setdefault(names[c], {"AP50": 0.0, "AP75": 0.0})
    values = list(per_class.values())
    return {
        "mAP50": float(np.mean([v["AP50"] for v in values])) if values else float("nan"),
        "mAP75": float(np.mean([v["AP75"] for v in values])) if values else float("nan"),
        "per_class": per_class,
    }


@torch.no_grad()
def evaluate_task(
    task: Task, images: Sequence[np.ndarray], scenes: Sequence[Scene], names: Sequence[str], size: tuple[int, int]
) -> dict[str, Any]:
    """Score a trained task network on (fused) images, with the scenes' labels."""
    task.model.eval()
    device = next(task.model.parameters()).device
    if task.kind == "seg":
        conf = np.zeros((len(names), len(names)), np.int64)
        for image, scene in zip(images, scenes):
            x = F.interpolate(to_unit(image).to(device), size=size, mode="bilinear", align_corners=False)
            mask = scene.label_mask()
            logits = F.interpolate(task.model(x), size=mask.shape, mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0].cpu().numpy(), mask, len(names))
        return segmentation_scores(conf, names)
    from ultralytics.utils.nms import non_max_suppression

    predictions, targets = [], []
    for image, scene in zip(images, scenes):
        x = F.interpolate(to_unit(image).to(device), size=size, mode="bilinear", align_corners=False)
        out = task.model(x)
        det = non_max_suppression(
            out[0] if isinstance(out, (tuple, list)) else out, conf_thres=0.001, iou_thres=0.7, nc=len(names)
        )[0]
        predictions.append(det.cpu())
        boxes = scene.boxes if scene.boxes is not None else np.zeros((0, 4), np.float32)
        classes = scene.classes if scene.classes is not None else np.zeros(0, np.int64)
        targets.append((boxes, classes))
    return detection_scores(predictions, targets, names, size)


def train_and_evaluate(
    task: Task,
    train_images: Sequence[np.ndarray],
    train_scenes: Sequence[Scene],
    test_images: Sequence[np.ndarray],
    test_scenes: Sequence[Scene],
    names: Sequence[str],
    size: tuple[int, int],
    *,
    epochs: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The paper's protocol: train ``task`` from scratch on fused training images, score it on
    fused test images. Images are 0-255 ``(H, W)`` arrays, aligned with their scenes."""
    torch.manual_seed(seed)
    device = next(task.model.parameters()).device
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=lr)
    samples = []
    for image, scene in zip(train_images, train_scenes):
        x = F.interpolate(to_unit(image), size=size, mode="bilinear", align_corners=False)[0]
        sample: dict[str, Any] = {"name": scene.name, "a": x, "b": x, "task_a": x, "task_b": x}
        if task.kind == "seg":
            sample["mask"] = F.interpolate(torch.from_numpy(scene.mask)[None, None].float(), size=size, mode="nearest")[
                0, 0
            ].long()
        else:
            sample["boxes"] = torch.from_numpy(scene.boxes if scene.boxes is not None else np.zeros((0, 4), np.float32))
            sample["classes"] = torch.from_numpy(scene.classes if scene.classes is not None else np.zeros(0, np.int64))
        samples.append(sample)
    task.model.train()
    for _ in tqdm(range(epochs), desc="task training", disable=not progress, leave=False):
        order = torch.randperm(len(samples)).tolist()
        for i in range(0, len(order), batch_size):
            batch = collate([samples[j] for j in order[i : i + batch_size]])
            batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            if "det" in batch:
                batch["det"] = {k: v.to(device) for k, v in batch["det"].items()}
            loss = task.loss(task.model(batch["task_a"]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return evaluate_task(task, test_images, test_scenes, names, size)


TASK_SEED_STRIDE = 1000
"""Task network ``k`` of ``fresh_task_scores`` is seeded ``seed + TASK_SEED_STRIDE * k``: the first is
the one network of the paper's protocol, so adding repeats keeps its score among them. The demo and
``run.py downstream`` start their scoring seeds this far from the training run's seed by default, so
that no scoring network starts from the weights the training run's task network started from."""


def average_scores(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of several score dicts of one layout (``train_and_evaluate``'s), key by key, nested
    dicts included."""
    if not runs:
        raise ValueError("average_scores needs at least one run")
    return {
        key: average_scores([run[key] for run in runs])
        if isinstance(value, Mapping)
        else float(np.mean([run[key] for run in runs]))
        for key, value in runs[0].items()
    }


def fresh_task_scores(
    build: Callable[[], Task],
    train_images: Sequence[np.ndarray],
    train_scenes: Sequence[Scene],
    test_images: Sequence[np.ndarray],
    test_scenes: Sequence[Scene],
    names: Sequence[str],
    size: tuple[int, int],
    *,
    repeats: int = 1,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """The paper's protocol with ``repeats`` fresh task networks, their scores averaged.

    Network ``k`` is built by ``build`` after ``torch.manual_seed(seed + TASK_SEED_STRIDE * k)`` and
    trained by ``train_and_evaluate`` (``options``: its ``epochs``, ``batch_size``, ``lr``,
    ``progress``) with that seed. With one network this is ``train_and_evaluate``'s result itself;
    with more, their mean (``average_scores``) and, under ``"task_networks"``, each network's seed
    and scores.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    seeds = [seed + TASK_SEED_STRIDE * k for k in range(repeats)]
    runs = []
    for task_seed in seeds:
        torch.manual_seed(task_seed)
        runs.append(
            train_and_evaluate(
                build(), train_images, train_scenes, test_images, test_scenes, names, size, seed=task_seed, **options
            )
        )
    if repeats == 1:
        return runs[0]
    return {**average_scores(runs), "task_networks": [{"seed": s, **run} for s, run in zip(seeds, runs, strict=True)]}


__all__ = [
    "TASK_SEED_STRIDE",
    "average_scores",
    "confusion_matrix",
    "detection_scores",
    "evaluate_task",
    "fresh_task_scores",
    "segmentation_scores",
    "train_and_evaluate",
]
