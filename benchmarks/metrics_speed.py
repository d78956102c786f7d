"""Speed of metaloss.fusion.metrics against a plain NumPy/SciPy evaluator, side by side.

The baseline follows ``spec/fusion-metrics.md`` the way the paper's evaluator does: one image at
a time, ``scipy.signal.convolve2d`` for the VIF windows and the Sobel responses, scikit-image's
``structural_similarity``, float32 where the reference uses float32. It is written here from the
definitions (no public code is copied) and checked against ours before timing.

    python benchmarks/metrics_speed.py [--pairs 8] [--rounds 3] [--threads 2] [--device cuda]

Alternates the two on the same pairs (these machines are shared and noisy) and prints the time
per 640x480 image of each, their ratio per round and its median, ours per metric, the largest
relative difference between the two, and ours per metric against the paper evaluator's values
(``metrics/msrs_reference.json``, 56 fused images).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity

from metaloss.fusion.image_io import read_grey
from metaloss.fusion.metrics import METRICS, en, evaluate_fusion, qabf, scd, sf, ssim, vif

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = SHARED / "MSRS"


def _gauss(n: int) -> np.ndarray:
    sigma = n / 5.0
    x, y = np.mgrid[-(n // 2) : n // 2 + 1, -(n // 2) : n // 2 + 1]
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return g / g.sum()


def _vifp(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0, eps: float = 1e-10) -> float:
    ref, dist = ref.astype(np.float64), dist.astype(np.float64)
    num = den = 0.0
    for scale in range(1, 5):
        win = _gauss(2 ** (4 - scale + 1) + 1)
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = convolve2d(ref * ref, win, mode="valid") - mu1 * mu1
        s2 = convolve2d(dist * dist, win, mode="valid") - mu2 * mu2
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g[s1 < eps] = 0
        sv[s1 < eps] = s2[s1 < eps]
        s1[s1 < eps] = 0
        g[s2 < eps] = 0
        sv[s2 < eps] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g**2 * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return num / den


def _edges(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)
    sx, sy = convolve2d(img, kx, mode="same"), convolve2d(img, ky, mode="same")
    g = np.sqrt(sx * sx + sy * sy)
    a = np.full_like(img, math.pi / 2)
    nz = sx != 0
    a[nz] = np.arctan(sy[nz] / sx[nz])
    return g, a


def _q(g_s: np.ndarray, a_s: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    ratio = np.zeros_like(g_s)
    gt, eq, lt = g_s > g_f, g_s == g_f, g_s < g_f
    ratio[gt], ratio[eq], ratio[lt] = g_f[gt] / g_s[gt], g_f[eq], g_s[lt] / g_f[lt]
    orient = 1 - np.abs(a_s - a_f) / (math.pi / 2)
    return 0.9994 / (1 + np.exp(-15 * (ratio - 0.5))) * 0.9879 / (1 + np.exp(-22 * (orient - 0.8)))


def baseline(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All six metrics of one image pair, NumPy/SciPy style (float32 images as read by OpenCV)."""
    hist = np.bincount(np.uint8(np.round(f)).ravel(), minlength=256) / f.size
    en = float(-np.sum(hist * np.log2(hist + (hist == 0))))
    sf = float(np.sqrt(np.mean((f[:, 1:] - f[:, :-1]) ** 2) + np.mean((f[1:, :] - f[:-1, :]) ** 2)))

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))

    scd = corr(f - b, a) + corr(f - a, b)
    vif = (_vifp(a, f) + _vifp(b, f)) / 2
    (ga, aa), (gb, ab), (gf, af) = _edges(a), _edges(b), _edges(f)
    qabf = float(np.sum(_q(ga, aa, gf, af) * ga + _q(gb, ab, gf, af) * gb) / np.sum(ga + gb))
    ssim = (structural_similarity(np.uint8(f), np.uint8(a)) + structural_similarity(np.uint8(f), np.uint8(b))) / 2
    return {"EN": en, "SF": sf, "SCD": scd, "VIF": vif, "Qabf": qabf, "SSIM": ssim}


def _timed(fn, sync: bool) -> float:  # type: ignore[no-untyped-def]
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _one_at_a_time(fn, f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sync: bool) -> float:  # type: ignore[no-untyped-def]
    """Seconds per image of ``fn`` called image by image, as evaluate_fusion calls it (best of 3)."""

    def run() -> None:
        for i in range(f.shape[0]):
            fn(f[i : i + 1], a[i : i + 1], b[i : i + 1])

    return min(_timed(run, sync) for _ in range(3)) / f.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8, help="MSRS sample pairs to time")
    p.add_argument("--rounds", type=int, default=3, help="alternating baseline / ours rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for ours")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sync = args.device.startswith("cuda")
    irs = sorted((DATA / "test" / "ir").glob("*.png"))[: args.pairs]
    images = []
    for ir in irs:
        ir_image, vi_image = read_grey(ir), read_grey(ir.parent.parent / "vi" / ir.name)
        images.append((np.maximum(ir_image, vi_image), ir_image, vi_image))
    f, a, b = (torch.from_numpy(np.stack([x[i] for x in images])).to(args.device) for i in range(3))
    n = len(images)

    base = [baseline(*x) for x in images]  # also the warm-up
    ours = evaluate_fusion(f, a, b)
    worst = max(abs(float(ours[k][i]) - base[i][k]) / abs(base[i][k]) for k in METRICS for i in range(n))
    print(f"{n} MSRS pairs of 640x480, fused = max(A, B); ours on {args.device} with {args.threads} torch threads")
    # Side by side: each round times the baseline, then ours (best of 3 passes), on the same pairs.
    ratios, base_times, our_times = [], [], []
    for r in range(args.rounds):
        t_base = _timed(lambda: [baseline(*x) for x in images], False) / n
        t_ours = min(_timed(lambda: evaluate_fusion(f, a, b), sync) for _ in range(3)) / n
        base_times.append(t_base)
        our_times.append(t_ours)
        ratios.append(t_base / t_ours)
        print(f"round {r + 1}: baseline {t_base:.3f} s, ours {t_ours * 1000:.1f} ms per image: {ratios[-1]:.1f}x")
    single = {name: _one_at_a_time(fn, f, a, b, sync) * 1000 for name, fn in SINGLE.items()}
    print("ours per metric (ms per image): " + ", ".join(f"{k} {v:.1f}" for k, v in single.items()))
    print(f"baseline (NumPy/SciPy, one image at a time): {statistics.median(base_times):.3f} s per image, median")
    print(f"metaloss.fusion.metrics: {statistics.median(our_times) * 1000:.1f} ms per image, median")
    print(f"speed-up {statistics.median(ratios):.1f}x (median of {args.rounds} rounds, lowest {min(ratios):.1f}x);")
    print(f"largest relative difference between the two {worst:.1e}")
    reference = _reference_differences(args.device)
    print("largest relative difference from the paper evaluator's values (56 images): ", end="")
    print(", ".join(f"{k} {v:.1e}" for k, v in reference.items()))


def _reference_differences(device: str) -> dict[str, float]:
    """Largest relative difference per metric between ours and ``msrs_reference.json``."""
    rows = json.loads((SHARED / "metrics" / "msrs_reference.json").read_text())
    paths = {p.name: p for p in DATA.glob("*/ir/*.png")}
    fused, a, b = [], [], []
    for row in rows:
        ir_image = read_grey(paths[row["pair"]])
        vi_image = read_grey(paths[row["pair"]].parent.parent / "vi" / row["pair"])
        mean = np.round(0.5 * ir_image + 0.5 * vi_image)
        fused.append(mean if row["fused"] == "mean" else np.maximum(ir_image, vi_image))
        a.append(ir_image)
        b.append(vi_image)
    f_t, a_t, b_t = (torch.from_numpy(np.stack(x)).to(device) for x in (fused, a, b))
    ours = evaluate_fusion(f_t, a_t, b_t)
    return {k: max(abs(float(ours[k][i]) - row[k]) / abs(row[k]) for i, row in enumerate(rows)) for k in METRICS}


SINGLE = {
    "EN": lambda f, a, b: en(f),
    "SF": lambda f, a, b: sf(f),
    "SCD": scd,
    "VIF": vif,
    "Qabf": qabf,
    "SSIM": ssim,
}


if __name__ == "__main__":
    main()
