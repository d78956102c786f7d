"""Procedural paired scenes: the embedded default data set (no download).

Each scene is a road seen by an infrared and a visible camera, in light or in the dark:

- *hot targets* (people, cars) are bright in infrared; in visible light they differ little from
  their surroundings, and in the dark not at all;
- *markings* (lane stripes) are painted: visible only, absent from infrared;
- the visible image carries texture; in the dark it is dim and noisy.

So a task that must find both targets and markings needs infrared at the targets and visible
light at the markings: exactly what a learned, per-pixel fusion loss should discover.

Segmentation classes: 0 background, 1 person, 2 car, 3 marking. Detection classes: 0 person,
1 car.
"""

from __future__ import annotations

import numpy as np
from data import Scene

SEG_CLASSES = ("background", "person", "car", "marking")
DET_CLASSES = ("person", "car")


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.zeros((h, w), np.float32)
    for _ in range(4):
        fy, fx = rng.uniform(0.05, 0.6, 2)
        tex += np.sin(fy * yy + fx * xx + rng.uniform(0, 6.28)) * rng.uniform(4, 12)
    return tex + rng.normal(0, 4, (h, w)).astype(np.float32)


def make_scene(index: int, size: tuple[int, int] = (96, 128), seed: int = 0) -> Scene:
    """One procedural scene (deterministic in ``(index, seed)``)."""
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
        x0 = rng.uniform(0.15, 0.85) * w
        slope = rng.uniform(-0.6, 0.6)
        for y in range(horizon + 2, h):
            xc = int(x0 + slope * (y - horizon))
            half = 1 + (y - horizon) // 24
            if 0 <= xc - half and xc + half < w and (y // 6) % 2 == 0:
                vis[y, xc - half : xc + half + 1] = 225.0
                mask[y, xc - half : xc + half + 1] = 3

    boxes, classes = [], []
    for _ in range(rng.integers(1, 4)):
        person = bool(rng.random() < 0.5)
        bh = int(rng.uniform(0.18, 0.35) * h) if person else int(rng.uniform(0.12, 0.2) * h)
        bw = max(3, int(bh * (0.4 if person else 1.8)))
        y0 = int(rng.uniform(horizon - bh * 0.3, h - bh - 1))
        x0 = int(rng.uniform(0, w - bw - 1))
        y0 = max(0, y0)
        cy, cx = y0 + bh / 2, x0 + bw / 2
        ys, xs = np.mgrid[y0 : y0 + bh, x0 : x0 + bw]
        body = ((ys - cy) / (bh / 2)) ** 2 + ((xs - cx) / (bw / 2)) ** 2 <= 1.0 if person else np.ones_like(ys, bool)
        ir[y0 : y0 + bh, x0 : x0 + bw][body] = rng.uniform(200, 240)
        vis_patch = vis[y0 : y0 + bh, x0 : x0 + bw]
        vis_patch[body] = vis_patch[body] + rng.uniform(-15, 15)
        mask[y0 : y0 + bh, x0 : x0 + bw][body] = 1 if person else 2
        boxes.append([cx / w, cy / h, bw / w, bh / h])
        classes.append(0 if person else 1)

    if dark:
        vis = vis * 0.25 + rng.normal(0, 6, (h, w))
    ir = ir + rng.normal(0, 3, (h, w))
    return Scene(
        name=f"scene{index:04d}{'N' if dark else 'D'}",
        a=np.clip(np.round(ir), 0, 255).astype(np.float32),
        b=np.clip(np.round(vis), 0, 255).astype(np.float32),
        mask=mask,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=np.asarray(classes, np.int64),
    )


def make_scenes(n: int, size: tuple[int, int] = (96, 128), seed: int = 0, start: int = 0) -> list[Scene]:
    """``n`` scenes, half of them dark."""
    return [make_scene(start + i, size, seed) for i in range(n)]
