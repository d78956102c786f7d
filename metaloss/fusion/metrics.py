"""The six fusion metrics of the TDFusion paper's evaluator, as batched torch functions.

Every function takes ``(N, H, W)`` (or ``(H, W)``) tensors on the 0-255 scale, on any device,
and returns ``(N,)`` float64 values. Images should be read as the reference pipeline reads them
(:func:`metaloss.fusion.image_io.read_grey`). Definitions follow ``spec/fusion-metrics.md``:

- EN: entropy (log2) of the 256-bin histogram of ``uint8(round(F))``;
- SF: spatial frequency;
- SCD: sum of correlations of differences, ``corr(F-B, A) + corr(F-A, B)``;
- VIF: pixel-domain VIF over 4 scales (equal to ``sewar.full_ref.vifp``);
- Q^AB/F: Xydeas-Petrovic gradient-based quality;
- SSIM: scikit-image's ``structural_similarity`` defaults on uint8 images.

VIF and SSIM compare the fused image with each source; ``convention="mean"`` (the TDFusion
paper's, default) averages the two values, ``"sum"`` (the widely copied CDDFuse evaluator's)
adds them.

References:
    Sheikh, Bovik, "Image information and visual quality", IEEE TIP 2006 (VIF).
    Xydeas, Petrovic, "Objective image fusion performance measure", Electronics Letters 2000.
    Wang et al., "Image quality assessment: from error visibility to structural similarity",
    IEEE TIP 2004 (SSIM).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["METRICS", "Convention", "en", "evaluate_fusion", "qabf", "scd", "sf", "ssim", "vif"]

Convention = Literal["mean", "sum"]
METRICS = ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM")


def _batch(x: Tensor) -> Tensor:
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"metrics take (N, H, W) or (H, W) images, got shape {tuple(x.shape)}")
    return x.double()


def en(fused: Tensor) -> Tensor:
    """Shannon entropy (bits) of the 256-bin histogram of ``uint8(round(fused))``."""
    f = _batch(fused)
    n = f.shape[0]
    values = f.round().clamp(0, 255).long().flatten(1) + 256 * torch.arange(n, device=f.device)[:, None]
    hist = torch.bincount(values.flatten(), minlength=256 * n).view(n, 256).double()
    p = hist / hist.sum(dim=1, keepdim=True)
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim=1)


def sf(fused: Tensor) -> Tensor:
    """Spatial frequency ``sqrt(mean(dx^2) + mean(dy^2))``."""
    f = _batch(fused)
    dx = f[:, :, 1:] - f[:, :, :-1]
    dy = f[:, 1:, :] - f[:, :-1, :]
    return torch.sqrt(dx.pow(2).mean(dim=(1, 2)) + dy.pow(2).mean(dim=(1, 2)))


def _corr2(x: Tensor, y: Tensor) -> Tensor:
    x = x - x.mean(dim=(1, 2), keepdim=True)
    y = y - y.mean(dim=(1, 2), keepdim=True)
    return (x * y).sum(dim=(1, 2)) / torch.sqrt(x.pow(2).sum(dim=(1, 2)) * y.pow(2).sum(dim=(1, 2)))


def scd(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Sum of the correlations of differences, ``corr2(F-B, A) + corr2(F-A, B)``."""
    f, a, b = _batch(fused), _batch(a), _batch(b)
    return _corr2(f - b, a) + _corr2(f - a, b)


def _gaussian_1d(size: int, device: torch.device) -> Tensor:
    sigma = size / 5.0
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: Tensor, g: Tensor) -> Tensor:
    """'valid' filtering of ``(N, H, W)`` by the separable window ``g g^T``."""
    k = g.numel()
    out = F.conv2d(x[:, None], g.view(1, 1, k, 1))
    return F.conv2d(out, g.view(1, 1, 1, k))[:, 0]


def _vif_single(ref: Tensor, dist: Tensor, sigma_nsq: float = 2.0, eps: float = 1e-10) -> Tensor:
    num = torch.zeros(ref.shape[0], dtype=torch.float64, device=ref.device)
    den = torch.zeros_like(num)
    for scale in range(1, 5):
        g = _gaussian_1d(2 ** (4 - scale + 1) + 1, ref.device)
        if scale > 1:
            ref = _filter_valid(ref, g)[:, ::2, ::2]
            dist = _filter_valid(dist, g)[:, ::2, ::2]
        mu1, mu2 = _filter_valid(ref, g), _filter_valid(dist, g)
        s1 = (_filter_valid(ref * ref, g) - mu1 * mu1).clamp(min=0)
        s2 = (_filter_valid(dist * dist, g) - mu2 * mu2).clamp(min=0)
        s12 = _filter_valid(ref * dist, g) - mu1 * mu2
        gain = s12 / (s1 + eps)
        sv = s2 - gain * s12
        low1 = s1 < eps
        gain = torch.where(low1, 0.0, gain)
        sv = torch.where(low1, s2, sv)
        s1 = torch.where(low1, 0.0, s1)
        low2 = s2 < eps
        gain = torch.where(low2, 0.0, gain)
        sv = torch.where(low2, 0.0, sv)
        negative = gain < 0
        sv = torch.where(negative, s2, sv)
        gain = torch.where(negative, 0.0, gain)
        sv = sv.clamp(min=eps)
        num += torch.log10(1 + gain**2 * s1 / (sv + sigma_nsq)).sum(dim=(1, 2))
        den += torch.log10(1 + s1 / sigma_nsq).sum(dim=(1, 2))
    return num / den


def vif(fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean") -> Tensor:
    """Pixel-domain VIF of the fused image against each source, combined by ``convention``."""
    f, a, b = _batch(fused), _batch(a), _batch(b)
    total = _vif_single(a, f) + _vif_single(b, f)
    return total / 2 if convention == "mean" else total


def _sobel_same(x: Tensor) -> tuple[Tensor, Tensor]:
    """3x3 Sobel responses with zero padding ('same'), signed as the reference's
    ``convolve2d(img, [[-1,0,1],[-2,0,2],[-1,0,1]])`` and ``convolve2d(img, [[1,2,1],[0,0,0],[-1,-2,-1]])``.

    The signs matter: where ``S_x = 0`` the orientation is pinned to +pi/2, so flipping one
    image's ``S_x`` sign changes ``|a_A - a_F|`` from near 0 to near pi at those pixels.
    """
    # A true convolution flips the kernel: correlate with the 180-degree rotations.
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    ky = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device)
    sx = F.conv2d(x[:, None], kx.view(1, 1, 3, 3), padding=1)[:, 0]
    sy = F.conv2d(x[:, None], ky.view(1, 1, 3, 3), padding=1)[:, 0]
    return sx, sy


def _edge_strength_orientation(x: Tensor) -> tuple[Tensor, Tensor]:
    sx, sy = _sobel_same(x)
    g = torch.sqrt(sx * sx + sy * sy)
    angle = torch.where(sx == 0, torch.full_like(sx, math.pi / 2), torch.atan(sy / torch.where(sx == 0, 1.0, sx)))
    return g, angle


def _q_edge(g_src: Tensor, a_src: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    # The reference's ratio: g_F/g_A where g_A > g_F, g_A/g_F where g_A < g_F, and g_F on a tie.
    ratio = torch.where(
        g_src > g_f, g_f / torch.where(g_src == 0, 1.0, g_src), torch.where(g_src == g_f, g_f, g_src / torch.where(g_f == 0, 1.0, g_f))
    )
    orientation = 1 - (a_src - a_f).abs() / (math.pi / 2)
    q_g = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5)))
    q_a = 0.9879 / (1 + torch.exp(-22 * (orientation - 0.8)))
    return q_g * q_a


def qabf(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Xydeas-Petrovic Q^AB/F (gradient-weighted edge preservation of both sources)."""
    f, a, b = _batch(fused), _batch(a), _batch(b)
    g_a, o_a = _edge_strength_orientation(a)
    g_b, o_b = _edge_strength_orientation(b)
    g_f, o_f = _edge_strength_orientation(f)
    num = (_q_edge(g_a, o_a, g_f, o_f) * g_a + _q_edge(g_b, o_b, g_f, o_f) * g_b).sum(dim=(1, 2))
    return num / (g_a + g_b).sum(dim=(1, 2))


def _ssim_single(x: Tensor, y: Tensor, data_range: float = 255.0, win: int = 7) -> Tensor:
    # scikit-image defaults: uniform 7x7 window, sample covariance, mean over the interior
    # (the border of (win-1)//2 pixels is cropped, so 'valid' pooling gives exactly that region).
    pool = lambda t: F.avg_pool2d(t[:, None], win, stride=1)[:, 0]  # noqa: E731
    cov_norm = win * win / (win * win - 1)
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2))


def ssim(fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean") -> Tensor:
    """SSIM of the uint8-rounded fused image with each source, combined by ``convention``."""
    f = _batch(fused).round().clamp(0, 255)
    a, b = _batch(a).round().clamp(0, 255), _batch(b).round().clamp(0, 255)
    total = _ssim_single(f, a) + _ssim_single(f, b)
    return total / 2 if convention == "mean" else total


def evaluate_fusion(fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean") -> dict[str, Tensor]:
    """All six metrics, ``{"EN": (N,), "SF": ..., "SCD": ..., "VIF": ..., "Qabf": ..., "SSIM": ...}``."""
    if convention not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")
    f, a, b = _batch(fused), _batch(a), _batch(b)
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"fused {tuple(f.shape)}, A {tuple(a.shape)} and B {tuple(b.shape)} must share one shape")
    return {
        "EN": en(f),
        "SF": sf(f),
        "SCD": scd(f, a, b),
        "VIF": vif(f, a, b, convention),
        "Qabf": qabf(f, a, b),
        "SSIM": ssim(f, a, b, convention),
    }
