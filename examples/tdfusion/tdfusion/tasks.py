"""Downstream task networks and their losses, built offline with random initialisation.

- ``segformer``: SegFormer-b0 from ``transformers`` (``SegformerConfig``, 1 input channel),
  cross-entropy on logits up-sampled to the label size.
- ``yolov8``: YOLOv8-n from ``ultralytics`` (``DetectionModel`` from its yaml, 1-channel stem)
  with ultralytics' own v8 detection loss (task-aligned assigner, CIoU, DFL; its default gains
  box 7.5, cls 0.5, dfl 1.5).
- ``unet``: a segmentation-models-pytorch U-Net (the swapping proof; any smp model works the
  same way).

A task is a module and a loss ``loss(output, batch) -> scalar``; nothing else is required of it,
so any other network plugs in the same way (see ``docs/tdfusion.md``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.checkpoint import load_module_state

TaskName = Literal["segformer", "yolov8", "unet"]
TASK_KINDS: dict[str, str] = {"segformer": "seg", "unet": "seg", "yolov8": "det"}


@dataclass
class Task:
    """A task network and its loss (``loss(output, batch) -> scalar``)."""

    name: str
    kind: str  # "seg" or "det"
    model: nn.Module
    loss: Any


class SegFormerB0(nn.Module):
    """SegFormer-b0 on 1-channel images; returns logits at 1/4 resolution."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(num_channels=1)  # the defaults are MiT-b0
        config.num_labels = num_classes
        self.net = SegformerForSemanticSegmentation(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pixel_values=x).logits


class StandardizedInput(nn.Module):
    """Run ``net`` on each image standardised to zero mean and unit variance (per image).

    The network then cannot tell a globally brighter or darker image from another: in TDFusion's
    meta step, a task network that sees raw intensities rewards whichever source is darker
    wherever background dominates (see ``docs/learned-loss-study.md``), and this removes that reward.
    """

    def __init__(self, net: nn.Module, eps: float = 1e-2) -> None:
        super().__init__()
        self.net = net
        self.eps = eps

    def forward(self, x: Tensor) -> Any:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return self.net((x - mean) / (std + self.eps))


class PadToMultiple(nn.Module):
    """Pad the input to a multiple of ``multiple`` (reflect) and crop the output back."""

    def __init__(self, net: nn.Module, multiple: int = 32) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        out = self.net(F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x)
        return out[..., :h, :w]


class SegmentationLoss:
    """Cross-entropy of logits up-sampled (bilinear) to the label size.

    Args:
        ignore_index: label value that does not count (e.g. 255 for "unlabelled").
        key: the batch key of the ``(B, H, W)`` int64 label map.
        class_weights: a weight per class (e.g. ``median_frequency_weights``), or ``None``.
    """

    def __init__(self, ignore_index: int = -100, key: str = "mask", class_weights: Tensor | None = None) -> None:
        self.ignore_index = ignore_index
        self.key = key
        self.class_weights = class_weights

    def __call__(self, logits: Tensor, batch: dict[str, Any]) -> Tensor:
        target = batch[self.key]
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=self.ignore_index)


def median_frequency_weights(masks: list[np.ndarray], num_classes: int, power: float = 1.0) -> Tensor:
    """Class weights ``(median(freq) / freq_c) ** power`` from label maps (median frequency balancing).

    ``power = 1`` is median frequency balancing; ``power = 1/2`` its square root, a gentler balance
    (rare classes weigh more, but a class's total weight still grows with its frequency). Classes
    that never occur get weight 0. Reference: Eigen & Fergus, "Predicting Depth, Surface Normals and
    Semantic Labels with a Common Multi-Scale Convolutional Architecture", ICCV 2015.
    """
    counts = np.zeros(num_classes, np.float64)
    for m in masks:
        counts += np.bincount(m[(m >= 0) & (m < num_classes)].ravel(), minlength=num_classes)[:num_classes]
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    weights = np.zeros(num_classes, np.float64)
    weights[present] = (np.median(freq[present]) / freq[present]) ** power
    return torch.tensor(weights, dtype=torch.float32)


def _yolo_config_dir() -> None:
    """Keep ultralytics' settings file out of the user's home unless they chose a place."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
    os.environ.setdefault("YOLO_OFFLINE", "1")


class DetectionLoss:
    """ultralytics' v8 detection loss on the fused batch, summed to a scalar.

    The batch holds ``batch["det"] = {"batch_idx": (N,), "cls": (N, 1), "bboxes": (N, 4)}`` with
    boxes as normalised ``(cx, cy, w, h)``, the format of ultralytics' own training batches.
    As in ultralytics' trainer the value is (box + cls + dfl) times the batch size.
    """

    def __init__(self, model: nn.Module, key: str = "det") -> None:
        from ultralytics.cfg import get_cfg
        from ultralytics.utils.loss import v8DetectionLoss

        if not hasattr(model, "args") or isinstance(model.args, dict):
            # ultralytics' default hyper-parameters: box 7.5, cls 0.5, dfl 1.5
            model.args = get_cfg()  # type: ignore[assignment]  # a plain attribute, as ultralytics sets it
        self.model = model
        self.inner = v8DetectionLoss(model)
        self.key = key

    def __call__(self, preds: Any, batch: dict[str, Any]) -> Tensor:
        det = batch[self.key]
        device = next(self.model.parameters()).device
        if self.inner.device != device:  # ultralytics' loss keeps tensors on the device it was built on
            from ultralytics.utils.loss import v8DetectionLoss

            self.inner = v8DetectionLoss(self.model)
        loss, _ = self.inner(preds, det)
        return loss.sum()


def build_task(name: TaskName, num_classes: int, weights: str | os.PathLike[str] | None = None) -> Task:
    """Build a task network (random init) and its loss.

    Args:
        name: ``"segformer"``, ``"yolov8"`` or ``"unet"``.
        num_classes: classes of the data set (background included for segmentation).
        weights: optional local state-dict file to start from (never downloaded).
    """
    if name == "segformer":
        task = Task(name, "seg", SegFormerB0(num_classes), SegmentationLoss())
    elif name == "unet":
        import segmentation_models_pytorch as smp

        unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=num_classes)
        task = Task(name, "seg", PadToMultiple(unet, 32), SegmentationLoss())
    elif name == "yolov8":
        _yolo_config_dir()
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel("yolov8n.yaml", nc=num_classes, ch=1, verbose=False)
        task = Task(name, "det", model, DetectionLoss(model))
    else:
        raise ValueError(f"unknown task network {name!r}; choose from {sorted(TASK_KINDS)}")
    if weights is not None:
        load_module_state(task.model, weights, "task_model", f"the {name} task network")
    return task


def detection_targets(boxes: list[Tensor], classes: list[Tensor]) -> dict[str, Tensor]:
    """ultralytics' batch format from per-image ``(n_i, 4)`` normalised cxcywh boxes and classes."""
    idx = torch.cat([torch.full((len(b),), i, dtype=torch.float32) for i, b in enumerate(boxes)])
    return {
        "batch_idx": idx,
        "cls": torch.cat([c.float() for c in classes]).view(-1, 1),
        "bboxes": torch.cat([b.float() for b in boxes]).view(-1, 4),
    }
