"""Procedural paired scenes: the embedded default data set (no download).

Each scene is a road seen by an infrared and a visible camera, in light or in the dark:

- *hot targets* (people, cars) are bright in infrared; in visible light they differ little from
  their surroundings, and in the dark not at all;
- *markings* (lane stripes) are painted: visible only, absent from infrared;
- the visible image carries texture; in the dark it is dim and noisy.

With ``decoys=True`` (the default) each scene also holds look-alikes that only one camera sees,
labelled background:

- *cold look-alikes*: person- and car-shaped patches that are bright in visible light only
  (posters, light paint), as bright as the hot targets are in infrared;
- *hot seams*: dashed stripes shaped like the markings that are warm in infrared only (sun-heated
  joints), as bright as that scene's markings are in visible light.

Why the look-alikes: without them, the average ``(A + B) / 2`` keeps every class visible (a
target or a marking keeps half its contrast), so a fixed ``w = 1/2`` fusion loses little and
per-pixel source choice cannot pay (measured by ``benchmarks/oracle_weights.py``). With them the
average destroys exactly the information a learned loss should keep: a target and its cold
look-alike (or a marking and a hot seam) have the same shape and the same averaged contrast,
and only *which camera* shows the contrast tells them apart. Infrared at the targets and visible
light at the markings (the oracle weights, ``oracle_weights``) keeps it.

Segmentation classes: 0 background, 1 person, 2 car, 3 marking. Detection classes: 0 person,
1 car.
"""

from __future__ import annotations

import numpy as np

from .data import Scene

SEG_CLASSES = ("background", "person", "car", "marking")
DET_CLASSES = ("person", "car")
COLD_LOOKALIKE, HOT_SEAM = 1, 2
"""The values of ``Scene.lookalikes`` where the generator put a look-alike (0 elsewhere)."""


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.zeros((h, w), np.float32)
    for _ in range(4):
        fy, fx = rng.uniform(0.05, 0.6, 2)
        tex += np.sin(fy * yy + fx * xx + rng.uniform(0, 6.28)) * rng.uniform(4, 12)
    return tex + rng.normal(0, 4, (h, w)).astype(np.float32)


def _dashed_stripe(
    rng: np.random.Generator, h: int, w: int, horizon: int, wide: bool = True
) -> list[tuple[int, int, int]]:
    """Rows ``(y, x_left, x_right)`` of one dashed stripe on the road (a lane marking's shape).

    ``wide``: 5 to 11 pixels across (else 3 to 5, the original scenes': below SegFormer's
    4-pixel output stride, so no task network learned them well whatever the fusion).
    """
    x0 = rng.uniform(0.15, 0.85) * w
    slope = rng.uniform(-0.6, 0.6)
    rows = []
    for y in range(horizon + 2, h):
        xc = int(x0 + slope * (y - horizon))
        half = 2 + (y - horizon) // 20 if wide else 1 + (y - horizon) // 24
        if 0 <= xc - half and xc + half < w and (y // 6) % 2 == 0:
            rows.append((y, xc - half, xc + half + 1))
    return rows


def _blob(rng: np.random.Generator, h: int, w: int, horizon: int) -> tuple[bool, int, int, int, int, np.ndarray]:
    """A person (ellipse) or car (rectangle): ``(person, y0, x0, bh, bw, body mask)``."""
    person = bool(rng.random() < 0.5)
    bh = int(rng.uniform(0.18, 0.35) * h) if person else int(rng.uniform(0.12, 0.2) * h)
    bw = max(3, int(bh * (0.4 if person else 1.8)))
    y0 = max(0, int(rng.uniform(horizon - bh * 0.3, h - bh - 1)))
    x0 = int(rng.uniform(0, w - bw - 1))
    cy, cx = y0 + bh / 2, x0 + bw / 2
    ys, xs = np.mgrid[y0 : y0 + bh, x0 : x0 + bw]
    body = ((ys - cy) / (bh / 2)) ** 2 + ((xs - cx) / (bw / 2)) ** 2 <= 1.0 if person else np.ones_like(ys, bool)
    return person, y0, x0, bh, bw, body


def make_scene(index: int, size: tuple[int, int] = (96, 128), seed: int = 0, decoys: bool = True) -> Scene:
    """One procedural scene (deterministic in ``(index, seed, decoys)``).

    Args:
        index: the scene's number (odd numbers are dark).
        size: ``(H, W)``.
        seed: the data set's seed.
        decoys: the default design: single-camera look-alikes (see the module docstring) and
            markings 5 to 11 pixels wide; ``False`` gives the original scenes (no look-alikes,
            markings 3 to 5 pixels wide), in which averaging loses little.
    """
    rng = np.random.default_rng([seed, index])
    h, w = size
    dark = bool(index % 2)
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    horizon = int(h * rng.uniform(0.3, 0.45))
    sky = yy < horizon
    mask = np.zeros((h, w), np.int64)
    vis: np.ndarray = np.where(sky, 150 + 40 * (1 - yy / max(horizon, 1)), 95.0).astype(np.float32)
    vis = vis + _texture(rng, h, w)
    ir: np.ndarray = np.where(sky, 40.0, 80 + 20 * (yy - horizon) / max(h - horizon, 1)).astype(np.float32)

    # Lane markings: bright paint on the road, visible only.
    for _ in range(rng.integers(1, 3)):
        for y, x0, x1 in _dashed_stripe(rng, h, w, horizon, wide=decoys):
            vis[y, x0:x1] = 225.0
            mask[y, x0:x1] = 3

    boxes, classes = [], []
    for _ in range(rng.integers(1, 4)):
        person, y0, x0, bh, bw, body = _blob(rng, h, w, horizon)
        ir[y0 : y0 + bh, x0 : x0 + bw][body] = rng.uniform(200, 240)
        vis_patch = vis[y0 : y0 + bh, x0 : x0 + bw]
        vis_patch[body] = vis_patch[body] + rng.uniform(-15, 15)
        mask[y0 : y0 + bh, x0 : x0 + bw][body] = 1 if person else 2
        boxes.append([(x0 + bw / 2) / w, (y0 + bh / 2) / h, bw / w, bh / h])
        classes.append(0 if person else 1)

    if dark:
        vis = vis * 0.25 + rng.normal(0, 6, (h, w))
    lookalikes = _add_decoys(rng, ir, vis, mask, horizon, dark) if decoys else np.zeros((h, w), np.uint8)
    ir = ir + rng.normal(0, 3, (h, w))
    return Scene(
        name=f"scene{index:04d}{'N' if dark else 'D'}",
        a=np.clip(np.round(ir), 0, 255).astype(np.float32),
        b=np.clip(np.round(vis), 0, 255).astype(np.float32),
        mask=mask,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=np.asarray(classes, np.int64),
        lookalikes=lookalikes,
    )


def _add_decoys(
    rng: np.random.Generator, ir: np.ndarray, vis: np.ndarray, mask: np.ndarray, horizon: int, dark: bool
) -> np.ndarray:
    """Cold look-alikes (visible only) and hot seams (infrared only), labelled background.

    Their contrast matches the real thing's in the other camera: a cold look-alike is as much
    brighter than the road in visible light as a hot target is in infrared, and a hot seam is
    as much warmer than the road as the scene's markings are brighter in visible light (dimmed
    at night). Labelled pixels are left as they are.

    Returns:
        Where they are (``Scene.lookalikes``): ``COLD_LOOKALIKE``, ``HOT_SEAM``, 0 elsewhere (a
        hot seam across a cold look-alike marks the pixels they share as the seam's).
    """
    h, w = ir.shape
    free = mask == 0
    where = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 3)):
        _, y0, x0, bh, bw, body = _blob(rng, h, w, horizon)
        region = np.zeros((h, w), bool)
        region[y0 : y0 + bh, x0 : x0 + bw] = body
        region &= free
        vis[region] = np.minimum(vis[region] + rng.uniform(110, 140), 250.0)
        where[region] = COLD_LOOKALIKE
    marking_contrast = (225.0 - 95.0) * (0.25 if dark else 1.0)
    for _ in range(rng.integers(1, 3)):
        for y, x0, x1 in _dashed_stripe(rng, h, w, horizon):
            row = free[y, x0:x1]
            ir[y, x0:x1][row] += marking_contrast
            where[y, x0:x1][row] = HOT_SEAM
    return where


MARKING_CHOICES = ("visible", "infrared", "half", "brighter")
"""What ``oracle_weights`` can put on marking pixels (``brighter``: whichever source is brighter
there, visible paint by day, the infrared road at night)."""


def oracle_weights(
    mask: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None, marking: str = "visible"
) -> np.ndarray:
    """The weights that keep each class's information: ``(2, H, W)`` float32 ``(w_a, w_b)``.

    ``w_infrared = 1`` on hot targets (classes 1, 2), ``w_visible = 1`` on markings (class 3),
    ``1/2`` elsewhere; or, given the sources ``a`` (infrared) and ``b`` (visible), the darker
    source on background pixels, which also hides the single-camera look-alikes.

    ``marking`` changes what the markings get, for measuring what that half of the oracle is
    worth: one of ``MARKING_CHOICES`` (``brighter`` needs the sources).
    """
    if marking not in MARKING_CHOICES:
        raise ValueError(f"marking={marking!r}: choose from {MARKING_CHOICES}")
    w_a = np.full(mask.shape, 0.5, np.float32)
    if a is not None and b is not None:
        w_a = (a < b).astype(np.float32)
    w_a[(mask == 1) | (mask == 2)] = 1.0
    markings = mask == 3
    if marking != "brighter":
        w_a[markings] = {"visible": 0.0, "infrared": 1.0, "half": 0.5}[marking]
    elif a is None or b is None:
        raise ValueError("marking='brighter' needs the sources a and b")
    else:
        w_a[markings] = (a > b)[markings]
    return np.stack([w_a, 1.0 - w_a])


def make_scenes(
    n: int, size: tuple[int, int] = (96, 128), seed: int = 0, start: int = 0, decoys: bool = True
) -> list[Scene]:
    """``n`` scenes, half of them dark."""
    return [make_scene(start + i, size, seed, decoys) for i in range(n)]
