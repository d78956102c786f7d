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
    """'valid' filtering of ``(N, H, W)`` float64 maps by the separable window ``g g^T``.

    Through the FFT: float64 direct convolution has no fast CPU kernel, and float32 is not
    enough (VIF takes variances as E[x^2] - E[x]^2 on the 0-255 scale and thresholds them at
    1e-10). The FFT's round-off is ~1e-16 of the largest value, far below those thresholds.
    """
    k = g.numel()
    h, w = x.shape[-2:]
    kernel = torch.outer(g, g).flip(0, 1)  # correlation = convolution with the flipped window
    spectrum = torch.fft.rfft2(x, s=(h, w)) * torch.fft.rfft2(kernel, s=(h, w))
    full = torch.fft.irfft2(spectrum, s=(h, w))  # circular; the 'valid' part does not wrap
    return full[..., k - 1 :, k - 1 :]


def _vif_pairs(refs: Tensor, dist: Tensor, sigma_nsq: float = 2.0, eps: float = 1e-10) -> Tensor:
    """VIF-P of ``dist`` ``(N, H, W)`` against each of ``refs`` ``(R, N, H, W)``; returns ``(R, N)``.

    All maps of a scale go through one batched filtering call (the fused image's statistics are
    shared by every reference).
    """
    r = refs.shape[0]
    num = torch.zeros(refs.shape[:2], dtype=torch.float64, device=refs.device)
    den = torch.zeros_like(num)
    for scale in range(1, 5):
        g = _gaussian_1d(2 ** (4 - scale + 1) + 1, refs.device)
        if scale > 1:
            both = _filter_valid(torch.cat([refs.flatten(0, 1), dist]), g)[:, ::2, ::2]
            refs, dist = both[: -dist.shape[0]].unflatten(0, (r, -1)), both[-dist.shape[0] :]
        flat_refs = refs.flatten(0, 1)
        maps = torch.cat([flat_refs, dist, flat_refs * flat_refs, dist * dist, (refs * dist).flatten(0, 1)])
        out = _filter_valid(maps, g)
        n_ref, n = flat_refs.shape[0], dist.shape[0]
        mu1, mu2 = out[:n_ref].unflatten(0, (r, -1)), out[n_ref : n_ref + n]
        e11 = out[n_ref + n : 2 * n_ref + n].unflatten(0, (r, -1))
        e22 = out[2 * n_ref + n : 2 * n_ref + 2 * n]
        e12 = out[2 * n_ref + 2 * n :].unflatten(0, (r, -1))
        s1 = (e11 - mu1 * mu1).clamp(min=0)
        s2 = (e22 - mu2 * mu2).clamp(min=0).expand_as(s1)
        s12 = e12 - mu1 * mu2
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
        num += torch.log10(1 + gain**2 * s1 / (sv + sigma_nsq)).sum(dim=(-2, -1))
        den += torch.log10(1 + s1 / sigma_nsq).sum(dim=(-2, -1))
    return num / den


def vif(fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean") -> Tensor:
    """Pixel-domain VIF of the fused image against each source, combined by ``convention``."""
    f, a, b = _batch(fused), _batch(a), _batch(b)
    total = _vif_pairs(torch.stack([a, b]), f).sum(dim=0)
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
        g_src > g_f,
        g_f / torch.where(g_src == 0, 1.0, g_src),
        torch.where(g_src == g_f, g_f, g_src / torch.where(g_f == 0, 1.0, g_f)),
    )
    orientation = 1 - (a_src - a_f).abs() / (math.pi / 2)
    q_g = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5)))
    q_a = 0.9879 / (1 + torch.exp(-22 * (orientation - 0.8)))
    return q_g * q_a


def qabf(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Xydeas-Petrovic Q^AB/F (gradient-weighted edge preservation of both sources).

    Computed in float32, as the reference evaluator computes it (its images are OpenCV float32);
    the two sums are accumulated in float64.
    """
    f, a, b = (_batch(x).float() for x in (fused, a, b))
    g_a, o_a = _edge_strength_orientation(a)
    g_b, o_b = _edge_strength_orientation(b)
    g_f, o_f = _edge_strength_orientation(f)
    num = (_q_edge(g_a, o_a, g_f, o_f) * g_a + _q_edge(g_b, o_b, g_f, o_f) * g_b).sum(dim=(1, 2), dtype=torch.float64)
    return num / (g_a + g_b).sum(dim=(1, 2), dtype=torch.float64)


def _box_mean_valid(x: Tensor, win: int) -> Tensor:
    """Mean over every ``win x win`` window fully inside ``x`` ``(M, H, W)`` (two 1-D passes)."""
    rows = F.avg_pool2d(x[:, None], (win, 1), stride=1)
    return F.avg_pool2d(rows, (1, win), stride=1)[:, 0]


def _ssim_pairs(f: Tensor, refs: Tensor, data_range: float = 255.0, win: int = 7) -> Tensor:
    """SSIM of ``f`` ``(N, H, W)`` with each of ``refs`` ``(R, N, H, W)``; returns ``(R, N)``.

    scikit-image's defaults: uniform 7x7 window, sample covariance, mean over the interior (the
    border of (win-1)//2 pixels is cropped, so 'valid' windows give exactly that region).
    """
    r = refs.shape[0]
    # float32 pooling on values centred at 128 (|x| <= 128, squares <= 16384): the variances'
    # cancellation error stays ~1e-3, against SSIM's stabiliser C2 = 58.5.
    f, refs = (f - 128).float(), (refs - 128).float()
    flat = refs.flatten(0, 1)
    means = _box_mean_valid(torch.cat([f, f * f, flat, flat * flat, (refs * f).flatten(0, 1)]), win).double()
    n, m = f.shape[0], flat.shape[0]
    ux, uxx = means[:n], means[n : 2 * n]
    uy, uyy = means[2 * n : 2 * n + m].unflatten(0, (r, -1)), means[2 * n + m : 2 * n + 2 * m].unflatten(0, (r, -1))
    uxy = means[2 * n + 2 * m :].unflatten(0, (r, -1))
    cov_norm = win * win / (win * win - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = ux + 128, uy + 128  # back to the 0-255 scale for the luminance term
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(-2, -1))


def ssim(fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean") -> Tensor:
    """SSIM of the uint8-rounded fused image with each source, combined by ``convention``."""
    f = _batch(fused).round().clamp(0, 255)
    a, b = _batch(a).round().clamp(0, 255), _batch(b).round().clamp(0, 255)
    total = _ssim_pairs(f, torch.stack([a, b])).sum(dim=0)
    return total / 2 if convention == "mean" else total


def evaluate_fusion(
    fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean", chunk: int = 1
) -> dict[str, Tensor]:
    """All six metrics, ``{"EN": (N,), "SF": ..., "SCD": ..., "VIF": ..., "Qabf": ..., "SSIM": ...}``.

    Args:
        fused: ``(N, H, W)`` or ``(H, W)`` on 0-255.
        a: the first source, same shape.
        b: the second source, same shape.
        convention: ``"mean"`` or ``"sum"`` of the two-source VIF and SSIM.
        chunk: images per batched pass; 1 is fastest on CPU (the maps stay in cache), larger
            batches pay off on a GPU.
    """
    if convention not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")
    f, a, b = _batch(fused), _batch(a), _batch(b)
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"fused {tuple(f.shape)}, A {tuple(a.shape)} and B {tuple(b.shape)} must share one shape")
    parts = []
    for i in range(0, f.shape[0], max(1, chunk)):
        fc, ac, bc = f[i : i + chunk], a[i : i + chunk], b[i : i + chunk]
        parts.append(
            {
                "EN": en(fc),
                "SF": sf(fc),
                "SCD": scd(fc, ac, bc),
                "VIF": vif(fc, ac, bc, convention),
                "Qabf": qabf(fc, ac, bc),
                "SSIM": ssim(fc, ac, bc, convention),
            }
        )
    return {name: torch.cat([p[name] for p in parts]) for name in METRICS}
