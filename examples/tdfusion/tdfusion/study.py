"""What a fusion loss is worth downstream: fixed weight maps, fusing scenes, scoring a fresh task net.

The pieces the oracle study (``benchmarks/oracle_weights.py``), the learned-against-fixed
benchmark (``benchmarks/learned_vs_fixed.py``) and the demo share:

- ``train_fusion_fixed`` trains ReFusion under a *fixed* per-pixel weight map (the oracle from
  the ground truth, ``1/2``, one source only), with the same loss terms TDFusion uses;
- ``fuse_arrays`` runs a fusion network on one pair (the ``fuse`` command uses it too), and
  ``fuse_scenes`` over whole scenes;
- ``downstream_miou`` is the paper's protocol (section 4.3) on those images: a fresh
  SegFormer-b0 trained on the fused training scenes, scored on the fused test scenes;
- ``weights_at`` says where a learned loss puts its weight: the mean infrared weight on
  hot-target pixels, the mean visible weight (and that of the brighter source) on marking
  pixels and beside them, by day and by night;
- ``map_directions`` and ``oracle_agreement`` say, for one (meta-train, meta-test) pair, what
  the meta-gradient asks of the weight map beside what the oracle asks
  (``benchmarks/meta_gradient_direction.py`` measures it pair by pair);
- ``OracleProbe`` is a ``metaloss.MetaTrainer`` callback that logs, at every epoch's
  end, those weights and the cosine between what the meta-gradient asks of the weight maps and
  the direction toward the oracle maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaloss import ConstantWeights, LearnableLoss, MetaStep, MetaTrainer, remove_component
from metaloss.callbacks import append_csv_row
from metaloss.checkpoint import get_rng_state, set_rng_state
from metaloss.fusion import ReFusion, tdfusion_loss

from .data import Scene, to_unit
from .downstream import fresh_task_scores
from .synthetic import COLD_LOOKALIKE, HOT_SEAM, MARKING_CHOICES, SEG_CLASSES, oracle_weights
from .tasks import Task, TaskName, build_task

__all__ = [
    "FIXED_MAPS",
    "OracleProbe",
    "downstream_miou",
    "fuse_arrays",
    "fuse_scenes",
    "map_directions",
    "oracle_agreement",
    "paired_interval",
    "scene_weights",
    "train_fusion_fixed",
    "weights_at",
]

WeightMap = Callable[[Scene], np.ndarray]


def _hiding_with_markings(marking: str) -> WeightMap:
    """``oracle_hiding`` with ``marking`` (``synthetic.MARKING_CHOICES``) on the marking pixels."""
    return lambda s: oracle_weights(s.label_mask(), s.a, s.b, marking=marking)


def _hiding_with_cold_lookalikes_visible_by_day(scene: Scene) -> np.ndarray:
    """``oracle_hiding`` with visible light on the cold look-alikes of daylight scenes: the map of a
    generator that meets the markings' bar by day but weighs each pixel by which camera shows it
    bright (there a cold look-alike is what a marking is: bright in visible light only)."""
    w = oracle_weights(scene.label_mask(), scene.a, scene.b)
    if scene.lookalikes is not None and _day_or_night(scene.name) == "day":
        cold = scene.lookalikes == COLD_LOOKALIKE
        w[0][cold], w[1][cold] = 0.0, 1.0
    return w


FIXED_MAPS: dict[str, WeightMap] = {
    "oracle": lambda s: oracle_weights(s.label_mask()),
    "oracle_hiding": lambda s: oracle_weights(s.label_mask(), s.a, s.b),
    **{f"oracle_hiding_markings_{c}": _hiding_with_markings(c) for c in MARKING_CHOICES if c != "visible"},
    "oracle_hiding_cold_lookalikes_visible": _hiding_with_cold_lookalikes_visible_by_day,
    "half": lambda s: np.full((2, *s.a.shape), 0.5, np.float32),
    "infrared": lambda s: np.stack([np.ones_like(s.a), np.zeros_like(s.a)]).astype(np.float32),
    "visible": lambda s: np.stack([np.zeros_like(s.a), np.ones_like(s.a)]).astype(np.float32),
}
"""Fixed ``(2, H, W)`` weight maps ``(w_infrared, w_visible)`` by name. The
``oracle_hiding_markings_*`` maps are ``oracle_hiding`` with something else than visible light on
the marking pixels (``synthetic.MARKING_CHOICES``); ``oracle_hiding_cold_lookalikes_visible`` gives
the cold look-alikes of daylight scenes visible light too."""


def train_fusion_fixed(
    scenes: Sequence[Scene],
    weight_map: WeightMap,
    *,
    steps: int,
    crop: int = 64,
    batch_size: int = 2,
    lr: float = 2e-3,
    alpha: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """ReFusion trained with Adam under ``L_int(w) + alpha L_grad`` for a fixed weight map ``w``.

    Each step takes ``batch_size`` random scenes and the same random ``crop`` window of both
    sources and of the weight map (as ``data.FusionDataset`` crops for TDFusion).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ReFusion()
    loss: LearnableLoss = tdfusion_loss(ConstantWeights(2), alpha=alpha)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    stacks = [torch.from_numpy(np.concatenate([np.stack([s.a, s.b]) / 255.0, weight_map(s)])).float() for s in scenes]
    model.train()
    for _ in tqdm(range(steps), desc="fusion (fixed weights)", disable=not progress, leave=False):
        picks = torch.randint(0, len(stacks), (batch_size,), generator=generator).tolist()
        windows = []
        for i in picks:
            h, w = stacks[i].shape[-2:]
            c = min(crop, h, w)
            y = int(torch.randint(0, h - c + 1, (), generator=generator))
            x = int(torch.randint(0, w - c + 1, (), generator=generator))
            windows.append(stacks[i][:, y : y + c, x : x + c])
        batch = torch.stack(windows)
        a, b, weights = batch[:, :1], batch[:, 1:2], batch[:, 2:]
        value = loss.combine(model(batch[:, :2]), [a, b], weights).total
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def fuse_arrays(model: nn.Module, a: np.ndarray, b: np.ndarray, device: torch.device) -> np.ndarray:
    """The network's raw output (float32, [0, 1]) for two 0-255 luminance images."""
    x = torch.cat([to_unit(a), to_unit(b)], dim=1).to(device)
    return model(x)[0, 0].float().cpu().numpy()


def fuse_scenes(model: nn.Module, scenes: Sequence[Scene]) -> list[np.ndarray]:
    """The fusion network's output on each whole scene, on the 0-255 scale (float32 ``(H, W)``)."""
    model.eval()
    device = next(model.parameters()).device
    return [fuse_arrays(model, s.a, s.b, device) * 255.0 for s in scenes]


def downstream_miou(
    train_images: Sequence[np.ndarray],
    train_scenes: Sequence[Scene],
    test_images: Sequence[np.ndarray],
    test_scenes: Sequence[Scene],
    *,
    epochs: int,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
    task_net: TaskName = "segformer",
    task: Task | None = None,
    repeats: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """A fresh segmentation network (SegFormer-b0 by default) trained on fused training images,
    scored on fused test images; with ``repeats``, that many fresh networks, their scores averaged
    (``downstream.fresh_task_scores``).

    ``task`` trains (in place) a network of the caller's instead of a fresh ``task_net``, so the
    caller keeps it; it should be freshly built too, for the paper's protocol (one network only).

    Returns:
        ``{"mIoU": ..., "mAcc": ..., "per_class": {name: {"IoU": ..., "Acc": ...}}}`` in %, and with
        ``repeats`` above 1 each network's seed and scores under ``"task_networks"``.
    """
    if task is not None and repeats != 1:
        raise ValueError("downstream_miou trains the caller's task network once; repeats must be 1 with task")
    return fresh_task_scores(
        (lambda: task) if task is not None else (lambda: build_task(task_net, len(SEG_CLASSES))),
        list(train_images),
        list(train_scenes),
        list(test_images),
        list(test_scenes),
        SEG_CLASSES,
        size,
        repeats=repeats,
        seed=seed,
        epochs=epochs,
        progress=progress,
    )


def _day_or_night(name: str) -> str:
    """``"night"`` for a dark procedural scene (its name ends in ``N``, as MSRS's do), else ``"day"``."""
    return "night" if name.endswith("N") else "day"


@torch.no_grad()
def scene_weights(loss: LearnableLoss, scene: Scene) -> np.ndarray:
    """A learnable loss's ``(2, H, W)`` weight map ``(w_infrared, w_visible)`` on a whole scene
    (float32, on the CPU; the loss may live on any device)."""
    device = next(iter(loss.parameters()), torch.empty(0)).device
    return loss.weights([to_unit(scene.a).to(device), to_unit(scene.b).to(device)])[0].float().cpu().numpy()


def _classes(*classes: int) -> Callable[[Scene], np.ndarray]:
    return lambda scene: np.isin(scene.label_mask(), classes)


def _marking_surround(mask: np.ndarray, reach: int = 3) -> np.ndarray:
    """Background pixels within ``reach`` pixels (a square) of a marking: the road beside it."""
    from scipy.ndimage import binary_dilation

    return np.asarray(binary_dilation(mask == 3, np.ones((2 * reach + 1,) * 2, bool))) & (mask == 0)


def _lookalikes(kind: int) -> Callable[[Scene], np.ndarray]:
    """The pixels of one kind of look-alike (``synthetic.COLD_LOOKALIKE`` or ``HOT_SEAM``); none on
    a scene that does not record them."""
    return lambda scene: (
        np.zeros(scene.a.shape, bool) if scene.lookalikes is None else np.asarray(scene.lookalikes == kind)
    )


_WEIGHT_REGIONS: dict[str, tuple[Callable[[Scene], np.ndarray], int | str]] = {
    "target_infrared": (_classes(1, 2), 0),
    "marking_visible": (_classes(3), 1),
    "marking_brighter": (_classes(3), "brighter"),
    "marking_surround_visible": (lambda scene: _marking_surround(scene.label_mask()), 1),
    "background_infrared": (_classes(0), 0),
    "cold_lookalike_visible": (_lookalikes(COLD_LOOKALIKE), 1),
    "hot_seam_infrared": (_lookalikes(HOT_SEAM), 0),
}
"""``weights_at``'s regions: name -> (the pixels of a scene; the source whose weight is averaged:
0 infrared, 1 visible, ``"brighter"`` whichever source is brighter at that pixel)."""


def weights_at(loss: LearnableLoss, scenes: Sequence[Scene]) -> dict[str, float]:
    """Where a learnable loss puts its weight on whole scenes.

    Returns:
        ``target_infrared``: mean ``w_infrared`` over hot-target pixels (classes 1 and 2);
        ``marking_visible``: mean ``w_visible`` over marking pixels (class 3);
        ``marking_brighter``: mean weight of the brighter source over marking pixels (the visible
        paint by day, the infrared road at night: what a fresh task network rewards there,
        ``benchmarks/oracle_weights.py``'s ``oracle_hiding_markings_brighter``);
        ``marking_surround_visible``: mean ``w_visible`` over the background within 3 pixels of
        a marking (does the map tell a marking from the road beside it?);
        ``background_infrared``: mean ``w_infrared`` over background pixels (class 0, the
        look-alikes included: a per-pixel map differs there from its targets);
        ``cold_lookalike_visible`` and ``hot_seam_infrared``: mean ``w_visible`` over the cold
        look-alikes and ``w_infrared`` over the hot seams (``Scene.lookalikes``; by day a cold
        look-alike shows as a marking does, bright in visible light only, and a hot seam as a
        target does, bright in infrared only: does the map tell them apart?); the same with
        ``_day`` / ``_night`` suffixes over light and dark scenes apart (``nan`` where a group
        has no such pixel).
    """
    sums: dict[str, list[float]] = {}
    for s in scenes:
        w = scene_weights(loss, s)
        when = _day_or_night(s.name)
        brighter = np.where(s.a > s.b, w[0], w[1])
        for key, (select, source) in _WEIGHT_REGIONS.items():
            pixels, values = select(s), (brighter if source == "brighter" else w[source])
            for name in (key, f"{key}_{when}"):
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += float(values[pixels].sum())
                total[1] += float(pixels.sum())
    keys = [f"{k}{suffix}" for k in _WEIGHT_REGIONS for suffix in ("", "_day", "_night")]
    return {k: (sums[k][0] / sums[k][1] if k in sums and sums[k][1] else float("nan")) for k in keys}


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean of paired differences and its two-sided Student-t confidence interval.

    Returns:
        ``(mean, low, high)``; ``low`` and ``high`` are ``nan`` for fewer than 2 differences.
    """
    from scipy.stats import t

    d = np.asarray(differences, np.float64)
    mean = float(d.mean()) if d.size else float("nan")
    if d.size < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return mean, mean - half, mean + half


def _view_keys(meta_step: MetaStep) -> tuple[str, str, str, str]:
    """The batch keys of the view the meta step's weight map covers: ``(mask, a, b, lookalikes)``:
    the crop (the paper's virtual step of ``F``'s parameters) or the task view
    (``virtual_step="output"``)."""
    if meta_step.virtual_step == "output":
        return "mask", "task_a", "task_b", "lookalikes"
    return "crop_mask", "a", "b", "crop_lookalikes"


def map_directions(meta_step: MetaStep, train_batch: Any, test_batch: Any) -> tuple[Tensor, Tensor]:
    """What one meta-gradient asks of the weight map, beside what the oracle asks.

    Runs ``meta_step``'s hypergradient (every option kept; no step is taken) on one
    (meta-train, meta-test) pair whose samples carry ``crop_mask`` (and ``mask``, the task view's,
    with ``virtual_step="output"``). As ``w_a + w_b = 1``, only ``w_a - w_b`` matters, so both
    directions are given on it, per pixel of the meta-train batch's view the map covers.

    Returns:
        ``(toward, descent)``, each ``(N, H, W)`` float32 on the CPU: ``toward`` is the oracle's
        ``w*_a - w*_b`` minus the current ``w_a - w_b`` (``synthetic.oracle_weights``: positive at
        hot targets, negative at markings); ``descent`` is ``-dL/dw_a + dL/dw_b``, the direction
        the meta-gradient moves the map (positive: toward infrared).
    """
    probe = copy.copy(meta_step)  # the same options; only hypergradient() is called
    probe.weight_map_grad = True
    _, stats = probe.hypergradient(train_batch, test_batch)
    assert stats.weights is not None and stats.weight_map_grad is not None
    masks = train_batch[_view_keys(meta_step)[0]].cpu()
    oracle = torch.stack([torch.from_numpy(oracle_weights(m.numpy())) for m in masks])
    toward = oracle - stats.weights.float().cpu()
    descent = -stats.weight_map_grad.float().cpu()
    return toward[:, 0] - toward[:, 1], descent[:, 0] - descent[:, 1]


def oracle_agreement(meta_step: MetaStep, train_batch: Any, test_batch: Any) -> dict[str, float]:
    """Does one pair's meta-gradient head for the oracle maps? (``map_directions`` summarised.)

    Returns:
        ``cos_to_oracle``: the cosine between the two directions over the labelled pixels;
        ``target_share`` and ``marking_share``: over hot-target (resp. marking) pixels, the
        descent's signed mass toward the oracle's source (infrared, resp. visible) divided by its
        absolute mass, in ``[-1, 1]`` (1: every such pixel is pushed toward the oracle; ``nan``
        where the batch has no such pixel); ``marking_share_day`` and ``marking_share_night``: the
        same over the markings of light and of dark scenes apart (visible light is the brighter
        source there by day, the infrared road at night); ``surround_share_day`` and
        ``surround_share_night``: the same share toward visible light over the road within 3
        pixels of a marking, and ``background_share_day``, ``background_share_night`` over the rest
        of the background (does the road beside a marking ask what the marking asks, or what the
        background asks?); where the batch carries the look-alikes (``data.FusionDataset``'s
        ``lookalikes`` / ``crop_lookalikes``), ``cold_lookalike_share_day`` / ``_night`` and
        ``hot_seam_share_day`` / ``_night``: the same share toward visible light over each kind
        (by day a cold look-alike is, pixel by pixel, what a marking is: bright in visible light
        only); ``cos_to_brighter``: the cosine, over all pixels,
        between the descent and the sources' difference ``a - b`` (1: the map moves toward
        whichever source is brighter, in proportion to how much brighter; -1: toward the darker;
        near either, one brightness preference is all the meta-gradient says);
        ``residual_cos_to_oracle``: ``cos_to_oracle`` once each image's part of the descent along
        ``a - b`` is removed (what the meta-gradient says beyond that one preference).
    """
    toward, descent = map_directions(meta_step, train_batch, test_batch)
    mask_key, a_key, b_key, lookalike_key = _view_keys(meta_step)
    masks = train_batch[mask_key].cpu()
    labelled = masks > 0
    t, d = toward[labelled], descent[labelled]
    result = {"cos_to_oracle": _cosine(t, d)}
    night = torch.tensor([_day_or_night(n) == "night" for n in train_batch["name"]]).view(-1, 1, 1)
    markings = masks == 3
    surround = torch.from_numpy(np.stack([_marking_surround(m) for m in masks.numpy()]))
    rest = (masks == 0) & ~surround
    regions = [
        ("target_share", (masks == 1) | (masks == 2), 1.0),
        ("marking_share", markings, -1.0),
        ("marking_share_day", markings & ~night, -1.0),
        ("marking_share_night", markings & night, -1.0),
        ("surround_share_day", surround & ~night, -1.0),
        ("surround_share_night", surround & night, -1.0),
        ("background_share_day", rest & ~night, -1.0),
        ("background_share_night", rest & night, -1.0),
    ]
    if lookalike_key in train_batch:
        where = train_batch[lookalike_key].cpu()
        for name, kind in (("cold_lookalike", COLD_LOOKALIKE), ("hot_seam", HOT_SEAM)):
            regions += [
                (f"{name}_share_day", (where == kind) & ~night, -1.0),
                (f"{name}_share_night", (where == kind) & night, -1.0),
            ]
    for key, pixels, sign in regions:
        v = descent[pixels] * sign
        mass = float(v.abs().sum())
        result[key] = float(v.sum()) / mass if mass > 0 else float("nan")
    difference = (train_batch[a_key] - train_batch[b_key])[:, 0].float().cpu()
    result["cos_to_brighter"] = _cosine(difference, descent)
    result["residual_cos_to_oracle"] = _cosine(t, remove_component(descent, difference)[labelled])
    return result


def _cosine(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum()) / max(float(x.norm() * y.norm()), 1e-30)


class OracleProbe:
    """A ``metaloss.MetaTrainer`` callback: is the meta-gradient heading for the oracle maps?

    At every epoch's end it computes, on fixed probe pairs (meta-train and meta-test batches
    whose samples carry ``crop_mask``), the outer loss's gradient ``g`` with respect to the
    weight map ``w`` (no step is taken) and the cosine between the descent direction ``-g`` and
    the direction toward the oracle ``w* - w`` over the labelled pixels (targets and markings),
    by day and by night. As ``w_a + w_b = 1``, only ``w_a - w_b`` matters: the cosine is taken
    between the two directions' ``a - b`` components. It also records ``weights_at`` on
    ``scenes``. Rows go to ``rows`` and, with ``path``, to a CSV file. The probe runs the trainer's
    own meta step (every option kept) and restores the random state, so the run is unchanged.

    Args:
        pairs: probe ``(meta-train batch, meta-test batch)`` pairs, already collated.
        scenes: whole scenes for ``weights_at``.
        path: CSV file to append rows to (``None``: keep them in memory only).
    """

    def __init__(self, pairs: Sequence[tuple[Any, Any]], scenes: Sequence[Scene], path: Any = None) -> None:
        self.pairs = list(pairs)
        self.scenes = list(scenes)
        self.path = path
        self.rows: list[dict[str, float]] = []

    def _cosines(self, trainer: MetaTrainer) -> dict[str, float]:
        dots: dict[str, list[float]] = {}
        for train_batch, test_batch in self.pairs:
            toward, descent = map_directions(trainer.meta_step, train_batch, test_batch)
            masks = train_batch[_view_keys(trainer.meta_step)[0]].cpu()
            for i, name in enumerate(train_batch["name"]):
                labelled = masks[i] > 0
                t, d = toward[i][labelled], descent[i][labelled]
                for key in ("cos_to_oracle", f"cos_to_oracle_{_day_or_night(name)}"):
                    acc = dots.setdefault(key, [0.0, 0.0, 0.0])
                    acc[0] += float((t * d).sum())
                    acc[1] += float((t * t).sum())
                    acc[2] += float((d * d).sum())
        return {k: v[0] / max(np.sqrt(v[1] * v[2]), 1e-30) for k, v in dots.items()}

    def on_epoch_end(self, trainer: MetaTrainer, epoch: int) -> None:
        rng = get_rng_state()  # the task model's dropout draws: probing must not change the run
        try:
            row: dict[str, float] = {
                "epoch": epoch + 1,
                **self._cosines(trainer),
                **weights_at(trainer.loss, self.scenes),
            }
        finally:
            set_rng_state(rng)
        self.rows.append(row)
        if self.path is not None:
            append_csv_row(self.path, row)
