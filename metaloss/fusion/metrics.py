"""The six fusion metrics of the TDFusion paper's evaluator, as batched torch functions.

Every function takes ``(N, H, W)`` (or ``(H, W)``) tensors on the 0-255 scale (float or
integer), on any device, and returns ``(N,)`` float64 values. VIF, Q^AB/F and SSIM work through
the batch ``default_images_per_pass`` images at a time: one on CPU, which keeps each map in
cache, 16 on an accelerator. Images should be read as the reference pipeline reads them
(``metaloss.fusion.image_io.read_grey``). Definitions follow ``spec/fusion-metrics.md``:

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

import functools
import math
import threading
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "METRICS",
    "VIF_MIN_SIZE",
    "Convention",
    "default_images_per_pass",
    "en",
    "evaluate_fusion",
    "qabf",
    "release_scratch",
    "scd",
    "sf",
    "ssim",
    "vif",
]

Convention = Literal["mean", "sum"]
METRICS = ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM")
VIF_MIN_SIZE = 41  # 41 -> 16 -> 6 -> 3 rows at VIF's four scales, the last filtered by a 3x3 window


def _batch(x: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """``x`` as ``(N, H, W)`` in ``dtype`` (``None``: its own)."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"metrics take (N, H, W) or (H, W) images, got shape {tuple(x.shape)}")
    return x if dtype is None else x.to(dtype)


def _uint8_values(x: Tensor) -> Tensor:
    """``(N, H, W)`` int32 values of ``uint8(round(x))``: rounded, clamped to 0-255."""
    x = _batch(x, None)
    return (x.round() if x.is_floating_point() else x).clamp(0, 255).int()


def _check_convention(convention: str) -> None:
    if convention not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")


def _combine(per_source: Tensor, convention: Convention) -> Tensor:
    """``(N, 2)`` values against each source -> ``(N,)``, by ``convention``."""
    return per_source.mean(dim=1) if convention == "mean" else per_source.sum(dim=1)


def default_images_per_pass(device: torch.device) -> int:
    """How many images VIF, Q^AB/F and SSIM process at once by default: 1 on CPU (each image's
    maps then stay in cache, measured faster than batching there), 16 on an accelerator (fewer
    kernel launches).

    Examples:
        >>> default_images_per_pass(torch.device("cpu")), default_images_per_pass(torch.device("cuda"))
        (1, 16)
    """
    return 1 if device.type == "cpu" else 16


def _in_passes(fn: Callable[..., Tensor], *images: Tensor, per_pass: int | None = None) -> Tensor:
    """``fn`` over consecutive groups of ``per_pass`` images (default ``default_images_per_pass``)."""
    step = per_pass or default_images_per_pass(images[0].device)
    return torch.cat([fn(*(x[i : i + step] for x in images)) for i in range(0, images[0].shape[0], step)])


def en(fused: Tensor) -> Tensor:
    """Shannon entropy (bits) of the 256-bin histogram of ``uint8(round(fused))``.

    Examples:
        >>> half = torch.zeros(1, 8, 8)
        >>> half[:, :, 4:] = 255.0  # two grey levels, equally frequent: one bit
        >>> en(half)
        tensor([1.], dtype=torch.float64)
    """
    values = _uint8_values(fused).long().flatten(1)
    n = values.shape[0]
    hist = torch.bincount((values + 256 * torch.arange(n, device=values.device)[:, None]).flatten(), minlength=256 * n)
    p = hist.view(n, 256).double() / values.shape[1]
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim=1)


def sf(fused: Tensor) -> Tensor:
    """Spatial frequency ``sqrt(mean(dx^2) + mean(dy^2))``.

    Examples:
        >>> sf(torch.full((1, 8, 8), 90.0)), sf(torch.rand(1, 8, 8) * 255) > 0  # a flat image has none
        (tensor([0.], dtype=torch.float64), tensor([True]))
    """
    f = _batch(fused)
    dx = f[:, :, 1:] - f[:, :, :-1]
    dy = f[:, 1:, :] - f[:, :-1, :]
    return torch.sqrt(dx.pow(2).mean(dim=(1, 2)) + dy.pow(2).mean(dim=(1, 2)))


def _corr2(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of centred ``(N, P)`` rows."""
    dot = torch.linalg.vecdot
    return dot(x, y) / torch.sqrt(dot(x, x) * dot(y, y))


def scd(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Sum of the correlations of differences, ``corr2(F-B, A) + corr2(F-A, B)``.

    Examples:
        >>> a, b = torch.rand(2, 64, 64) * 255, torch.rand(2, 64, 64) * 255
        >>> scd((a + b) / 2, a, b).shape  # one value per image
        torch.Size([2])
    """
    f, a, b = (x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True) for x in (_batch(fused), _batch(a), _batch(b)))
    return _corr2(f - b, a) + _corr2(f - a, b)


@functools.lru_cache(maxsize=8)
def _gaussian_taps(size: int) -> tuple[float, ...]:
    """The 1-D factor ``g`` of VIF's window ``g g^T``: N = ``size``, sigma = N / 5, sum 1."""
    sigma = size / 5.0
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    return tuple(v / math.fsum(g) for v in g)


class _Scratch(threading.local):
    """Named scratch tensors kept between calls, one set per thread, on CPU only.

    A fresh multi-megabyte CPU tensor costs a page fault per 4 KiB page when first written, and
    the C allocator returns freed blocks of that size to the system: measured here, VIF on one
    640x480 image took 6,900 minor page faults per call, which was most of its time. Reusing
    the same buffers from image to image removes them. (CUDA's caching allocator already
    reuses memory, so on other devices this hands out fresh tensors.)
    """

    LIMIT = 96  # buffers kept; past it (images of many sizes) the set starts afresh

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, tuple[int, ...]], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=like.device)
        key = (name, dtype, tuple(shape))
        buffer = self.buffers.get(key)
        if buffer is None:
            if len(self.buffers) >= self.LIMIT:
                self.buffers.clear()
            buffer = self.buffers[key] = torch.empty(shape, dtype=dtype)
        return buffer


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the scratch tensors the metrics keep between calls on this thread (tens of MB for
    640x480 images).

    Examples:
        >>> _ = vif(torch.rand(1, 64, 64) * 255, torch.rand(1, 64, 64) * 255, torch.rand(1, 64, 64) * 255)
        >>> release_scratch()  # e.g. after evaluating a folder of large images, before training
    """
    _SCRATCH.buffers.clear()


def _gaussian_filter_valid(x: Tensor, size: int, step: int = 1, *, into: str) -> Tensor:
    """'valid' filtering of float64 ``(..., H, W)`` maps by VIF's Gaussian window of ``size``,
    keeping every ``step``-th output row and column (2: the step between scales); the result is
    the scratch tensor named ``into``.

    Direct separable sums of shifted slices, one map at a time: float64 throughout, since VIF
    takes variances as E[x^2] - E[x]^2 on the 0-255 scale and thresholds them at 1e-10 (float32
    is not enough). On CPU this beats float64 FFT filtering (a 17x17 window on 480x640, one run:
    1.2 ms against 3.5 ms for rfft2, product and irfft2), and strided outputs cost only what is
    kept. The window is symmetric, so this is the reference's correlation.
    """
    g = _gaussian_taps(size)
    rows = (x.shape[-2] - size) // step + 1
    cols = (x.shape[-1] - size) // step + 1
    last_row, last_col = (rows - 1) * step + 1, (cols - 1) * step + 1
    # down the columns first: contiguous row blocks
    down = torch.mul(x[..., 0:last_row:step, :], g[0], out=_SCRATCH.get("down", (*x.shape[:-2], rows, x.shape[-1]), x))
    for i in range(1, size):
        down.add_(x[..., i : i + last_row : step, :], alpha=g[i])
    out = torch.mul(down[..., 0:last_col:step], g[0], out=_SCRATCH.get(into, (*x.shape[:-2], rows, cols), x))
    for i in range(1, size):
        out.add_(down[..., i : i + last_col : step], alpha=g[i])
    return out


def _vif_pass(dist: Tensor, *refs: Tensor, sigma_nsq: float = 2.0, eps: float = 1e-10) -> Tensor:
    """VIF-P of float64 ``(N, H, W)`` images ``dist`` against each of ``refs``; returns ``(N, R)``.

    The reference's masking (``g = 0`` where ``s1 < eps`` or ``s2 < eps``, ``sv = s2`` where
    ``g < 0``, ``s1 = 0`` where ``s1 < eps``, ``sv >= eps``) reduces to: zero ``s1`` below eps,
    clamp the gain at 0 and drop the pixels where ``s2 < eps`` from the numerator. Natural logs
    replace log10: the base cancels in the ratio. Every map lives in a named scratch tensor.
    """
    num = dist.new_zeros(dist.shape[0], len(refs))
    den = torch.zeros_like(num)
    scratch = _SCRATCH.get
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        if scale > 1:  # filter, then keep every second pixel
            refs = tuple(_gaussian_filter_valid(r, size, 2, into=f"ref{j}@{scale}") for j, r in enumerate(refs))
            dist = _gaussian_filter_valid(dist, size, 2, into=f"dist@{scale}")
        product = scratch("product", dist.shape, dist)
        mu2 = _gaussian_filter_valid(dist, size, into="mu2")
        s2 = _gaussian_filter_valid(torch.mul(dist, dist, out=product), size, into="s2")
        s2.addcmul_(mu2, mu2, value=-1).clamp_(min=0)
        low2 = torch.lt(s2, eps, out=scratch("low2", s2.shape, s2, torch.bool))
        s2_noise = s2.add_(sigma_nsq)
        low1 = scratch("low1", s2.shape, s2, torch.bool)
        gain, sv = scratch("gain", s2.shape, s2), scratch("sv", s2.shape, s2)
        for j, ref in enumerate(refs):
            mu1 = _gaussian_filter_valid(ref, size, into="mu1")
            s1 = _gaussian_filter_valid(torch.mul(ref, ref, out=product), size, into="s1")
            s1.addcmul_(mu1, mu1, value=-1)
            s1.masked_fill_(torch.lt(s1, eps, out=low1), 0)
            s12 = _gaussian_filter_valid(torch.mul(ref, dist, out=product), size, into="s12")
            s12.addcmul_(mu1, mu2, value=-1)
            torch.div(s12, torch.add(s1, eps, out=gain), out=gain).clamp_(min=0)
            torch.addcmul(s2_noise, gain, s12, value=-1, out=sv).clamp_(min=eps + sigma_nsq)  # max(sv, eps) + sn^2
            info = gain.square_().mul_(s1).div_(sv).masked_fill_(low2, 0)
            num[:, j] += info.log1p_().sum(dim=(-2, -1))
            den[:, j] += s1.div_(sigma_nsq).log1p_().sum(dim=(-2, -1))
    return num / den


def vif(
    fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean", *, images_per_pass: int | None = None
) -> Tensor:
    """Pixel-domain VIF of the fused image against each source, combined by ``convention``.

    ``images_per_pass``: images filtered at once (default ``default_images_per_pass``).

    Examples:
        >>> a, b = torch.rand(1, 64, 64) * 255, torch.rand(1, 64, 64) * 255
        >>> round(float(vif(a, a, a)), 4)  # an image has all of its own information
        1.0
        >>> vif(a, a, b, convention="sum").shape  # "mean" (TDFusion) or "sum" (CDDFuse) of the two sources
        torch.Size([1])
    """
    _check_convention(convention)
    f, a, b = _batch(fused), _batch(a), _batch(b)
    if min(f.shape[-2:]) < VIF_MIN_SIZE:
        raise ValueError(
            f"VIF needs images of at least {VIF_MIN_SIZE}x{VIF_MIN_SIZE} pixels (its fourth scale would be empty), "
            f"got {tuple(f.shape[-2:])}"
        )
    return _combine(_in_passes(_vif_pass, f, a, b, per_pass=images_per_pass), convention)


def _sobel_same(x: Tensor) -> tuple[Tensor, Tensor]:
    """3x3 Sobel responses of ``(..., H, W)`` maps with zero padding ('same'), signed as the
    reference's ``convolve2d(img, [[-1,0,1],[-2,0,2],[-1,0,1]])`` and
    ``convolve2d(img, [[1,2,1],[0,0,0],[-1,-2,-1]])``.

    The signs matter: where ``S_x = 0`` the orientation is pinned to +pi/2, so flipping one
    image's ``S_x`` sign changes ``|a_A - a_F|`` from near 0 to near pi at those pixels. Written
    as separable slice sums (exact for integer images, and faster than a 1-channel conv2d).
    """
    p = F.pad(x, (1, 1, 1, 1))
    vertical = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]  # [1, 2, 1] down the columns
    horizontal = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]  # [1, 2, 1] along the rows
    return vertical[..., :-2] - vertical[..., 2:], horizontal[..., 2:, :] - horizontal[..., :-2, :]


def _edge_strength_orientation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Edge strength ``sqrt(S_x^2 + S_y^2)`` and orientation ``arctan(S_y / S_x)`` (pi/2 where
    ``S_x = 0``) of ``(..., H, W)`` maps."""
    sx, sy = _sobel_same(x)
    strength = (sx * sx).addcmul_(sy, sy).sqrt_()
    # arctan(S_y / S_x) = atan2(S_y sign(S_x), |S_x|): no division, and atan2 is the faster kernel
    orientation = torch.atan2(sy * sx.sign(), sx.abs()).masked_fill_(sx == 0, math.pi / 2)
    return strength, orientation


def _weighted_edge_preservation(g_src: Tensor, a_src: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    """``sum(Q_SF * g_S)`` per image, without the constant 0.9994 * 0.9879."""
    # The reference's ratio: g_F/g_S where g_S > g_F, g_S/g_F where g_S < g_F, and g_F on a tie.
    ratio = torch.minimum(g_src, g_f).div_(torch.maximum(g_src, g_f))
    ratio = torch.where(g_src == g_f, g_f, ratio)
    # 1 / (1 + exp(-15 (ratio - 0.5))) and 1 / (1 + exp(-22 (1 - |da| / (pi/2) - 0.8))) as sigmoids
    q = ratio.mul_(15).sub_(7.5).sigmoid_()
    q *= (a_src - a_f).abs_().mul_(-44 / math.pi).add_(4.4).sigmoid_()
    return q.mul_(g_src).sum(dim=(-2, -1), dtype=torch.float64)


def _qabf_pass(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Q^AB/F of float32 ``(N, H, W)`` images; the three sums are accumulated in float64."""
    g_a, o_a = _edge_strength_orientation(a)
    g_b, o_b = _edge_strength_orientation(b)
    g_f, o_f = _edge_strength_orientation(f)
    num = _weighted_edge_preservation(g_a, o_a, g_f, o_f) + _weighted_edge_preservation(g_b, o_b, g_f, o_f)
    total = g_a.sum(dim=(-2, -1), dtype=torch.float64) + g_b.sum(dim=(-2, -1), dtype=torch.float64)
    return 0.9994 * 0.9879 * num / total


def qabf(fused: Tensor, a: Tensor, b: Tensor, *, images_per_pass: int | None = None) -> Tensor:
    """Xydeas-Petrovic Q^AB/F (gradient-weighted edge preservation of both sources).

    Computed in float32, as the reference evaluator computes it (its images are OpenCV float32).
    ``images_per_pass``: images processed at once (default ``default_images_per_pass``).

    Examples:
        >>> a, b = torch.rand(1, 32, 32) * 255, torch.rand(1, 32, 32) * 255
        >>> bool(qabf((a + b) / 2, a, b) > qabf(torch.full_like(a, 128.0), a, b))  # edges kept beat a flat image
        True
    """
    f, a, b = (_batch(x, torch.float32) for x in (fused, a, b))
    return _in_passes(_qabf_pass, f, a, b, per_pass=images_per_pass)


def _window_sum(x: Tensor, win: int, dim: int) -> Tensor:
    """Sums of every ``win`` consecutive entries of ``x`` along ``dim`` ('valid'), by doubling:
    ``O(log win)`` additions instead of ``win - 1``."""
    n = x.shape[dim] - win + 1
    out: Tensor | None = None
    block, length, offset, rest = x, 1, 0, win  # block[i] = x[i] + ... + x[i + length - 1]
    while True:
        if rest & 1:
            piece = block.narrow(dim, offset, n)
            out = piece if out is None else out + piece
            offset += length
        rest >>= 1
        if not rest:
            return out  # type: ignore[return-value]
        m = block.shape[dim] - length
        block = block.narrow(dim, 0, m) + block.narrow(dim, length, m)
        length *= 2


def _box_sum(x: Tensor, win: int) -> Tensor:
    """Sum over every ``win x win`` window fully inside the ``(..., H, W)`` maps ``x``."""
    return _window_sum(_window_sum(x, win, -1), win, -2)


def _ssim_pass(x: Tensor, *refs: Tensor, data_range: float = 255.0, win: int = 7) -> Tensor:
    """SSIM of int32 ``(N, H, W)`` images with values 0-255 against each of ``refs`` (same kind);
    returns ``(N, R)``.

    scikit-image's defaults: uniform 7x7 window, sample covariance, mean over the interior (the
    border of (win-1)//2 pixels is cropped, so 'valid' windows give exactly that region). The
    window sums and the moments' cancellations are exact int32 arithmetic (every value stays
    below 2**31 for 0-255 images and windows up to 7x7); only the final ratio is float32.
    """
    n = win * win
    c1, c2 = (0.01 * data_range) ** 2 * n * n, (0.03 * data_range) ** 2 * n * (n - 1)
    sx, sxx = _box_sum(x, win), _box_sum(x * x, win)
    sx_sx = sx * sx
    values = []
    for y in refs:
        sy, syy, sxy = _box_sum(y, win), _box_sum(y * y, win), _box_sum(x * y, win)
        sx_sy, sy_sy = sx * sy, sy * sy
        # SSIM = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)), scaled by n^2 and n(n-1)
        luminance = (2 * sx_sy).float().add_(c1).div_((sx_sx + sy_sy).float().add_(c1))
        structure = (2 * (n * sxy - sx_sy)).float().add_(c2)
        structure /= (n * (sxx + syy) - sx_sx - sy_sy).float().add_(c2)
        values.append(luminance.mul_(structure).mean(dim=(-2, -1), dtype=torch.float64))
    return torch.stack(values, dim=1)


def ssim(
    fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean", *, images_per_pass: int | None = None
) -> Tensor:
    """SSIM of the uint8-rounded fused image with each source, combined by ``convention``.

    ``images_per_pass``: images processed at once (default ``default_images_per_pass``).

    Examples:
        >>> a = torch.rand(1, 32, 32) * 255
        >>> round(float(ssim(a, a, a)), 4), round(float(ssim(a, a, a, convention="sum")), 4)
        (1.0, 2.0)
    """
    _check_convention(convention)
    f, a, b = (_uint8_values(x) for x in (fused, a, b))
    return _combine(_in_passes(_ssim_pass, f, a, b, per_pass=images_per_pass), convention)


def evaluate_fusion(
    fused: Tensor, a: Tensor, b: Tensor, convention: Convention = "mean", *, images_per_pass: int | None = None
) -> dict[str, Tensor]:
    """All six metrics, ``{"EN": (N,), "SF": ..., "SCD": ..., "VIF": ..., "Qabf": ..., "SSIM": ...}``.

    Args:
        fused: ``(N, H, W)`` or ``(H, W)`` on 0-255.
        a: the first source, same shape.
        b: the second source, same shape.
        convention: ``"mean"`` or ``"sum"`` of the two-source VIF and SSIM.
        images_per_pass: images evaluated at once (default ``default_images_per_pass``: 1 on CPU,
            where the maps then stay in cache; 16 on an accelerator).

    Examples:
        >>> ir, vis = torch.rand(2, 64, 64) * 255, torch.rand(2, 64, 64) * 255
        >>> scores = evaluate_fusion((ir + vis) / 2, ir, vis)  # fused, source A, source B: (N, H, W) on 0-255
        >>> {name: tuple(value.shape) for name, value in scores.items()}
        {'EN': (2,), 'SF': (2,), 'SCD': (2,), 'VIF': (2,), 'Qabf': (2,), 'SSIM': (2,)}
    """
    _check_convention(convention)
    f, a, b = _batch(fused, None), _batch(a, None), _batch(b, None)
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"fused {tuple(f.shape)}, A {tuple(a.shape)} and B {tuple(b.shape)} must share one shape")
    step = images_per_pass or default_images_per_pass(f.device)
    rows = []
    for i in range(0, f.shape[0], step):
        fi, ai, bi = f[i : i + step], a[i : i + step], b[i : i + step]
        # once, for the float64 metrics, into buffers kept between calls (see _Scratch)
        f64, a64, b64 = (_SCRATCH.get(name, x.shape, x, torch.float64).copy_(x) for name, x in zip("fab", (fi, ai, bi)))
        rows.append(
            {
                "EN": en(fi),
                "SF": sf(f64),
                "SCD": scd(f64, a64, b64),
                "VIF": vif(f64, a64, b64, convention, images_per_pass=step),
                "Qabf": qabf(fi, ai, bi, images_per_pass=step),
                "SSIM": ssim(fi, ai, bi, convention, images_per_pass=step),
            }
        )
    return {name: torch.cat([row[name] for row in rows]) for name in METRICS}
