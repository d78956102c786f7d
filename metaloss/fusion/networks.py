"""The ReFusion fusion network and TDFusion's loss generation module, written plainly.

Both are fully convolutional stacks of Restormer blocks (transposed, channel-wise attention), so
any ``H x W`` works. No "meta" shadow layers: the core's stateless inner step runs them as they
are. Parameter names follow the authors' release, so their ``.pth`` files load after
``load_released_weights`` drops the duplicated keys.

References:
    Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022.
    Bai et al., "ReFusion: Learning Image Fusion from Reconstruction with Learnable Loss via
    Meta-Learning", IJCV 2024 (the fusion network, 59,856 parameters).
    Bai et al., "Task-driven Image Fusion with Learnable Fusion Loss", CVPR 2025 (the loss
    generation module, 44,529 parameters).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from metaloss.activation_checkpointing import checkpointed_call
from metaloss.checkpoint import load_weights_file
from metaloss.fusion.bands import (
    BandedTensor,
    ChannelAttentionSums,
    band_rows,
    memory_format_of,
    mix_into,
    row_bands,
    worth_banding,
)

__all__ = ["LossGenerator", "ReFusion", "RestormerBlock", "load_released_weights"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` tensor, with bias (eps 1e-5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _records_graph(*tensors: Tensor) -> bool:
    """Whether an operation on ``tensors`` is recorded for a backward pass."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _channel_major_where_recorded(qkv: Tensor) -> Tensor:
    """``qkv`` laid out channel-major where a graph is recorded and it is a channels-last map on
    the CPU; otherwise ``qkv`` itself. The values are the same to the bit.

    The attention's textbook order (the graph path) reads ``q``, ``k`` and ``v`` channel-major.
    Copied one by one from a channels-last ``qkv`` map, each gathers one value per cache line;
    copied whole, image by image as 2-D matrix transposes, PyTorch copies in cache-sized blocks:
    3x less time at 2 x 96 x 256^2 (2 CPU threads; ``docs/benchmarks.md``). Not while
    ``torch.compile`` traces (inductor picks its own layouts).
    """
    if (
        torch.compiler.is_compiling()
        or qkv.device.type != "cpu"
        or qkv.is_contiguous()
        or not qkv.is_contiguous(memory_format=torch.channels_last)
        or not _records_graph(qkv)
    ):
        return qkv
    out: Tensor = _ChannelMajor.apply(qkv)
    return out


class _ChannelMajor(torch.autograd.Function):
    """A channels-last ``(B, C, H, W)`` map copied channel-major, each image as one 2-D transpose
    (``(H*W, C)`` to ``(C, H*W)``, which ``Tensor.copy_`` runs in cache blocks). Index for index
    the values are the same, so gradients and tangents pass through unchanged, as for
    ``Tensor.contiguous``."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of a channels-last map
        for image in range(b):
            out[image].view(c, h * w).copy_(rows[image].t())
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return tangent


def _transposed_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor, precise: bool = True
) -> Tensor:
    """Channel attention: ``softmax(norm(q) norm(k)^T * t) v`` per head, over ``C/heads`` channels.

    The two reductions over all ``H*W`` pixels (the L2 norms and the ``q k^T`` Gram matrix) are
    accumulated in float64 for float32 inputs (float32 for half precision): at 640x480 that is
    307,200 terms, and float32 accumulation alone moves the network's output by 1.9e-5, against
    1.1e-6 this way, for ~16% more time at that size. ``precise=False`` keeps the input's dtype.
    The Gram matrix of the raw ``q`` and ``k`` is divided by their norms (``_cosine_gram``).
    """
    h, w = q.shape[-2:]
    dtype = q.dtype
    wide = torch.float64 if dtype == torch.float32 else torch.promote_types(dtype, torch.float32)
    wide = wide if precise else dtype
    q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=heads) for t in (q, k, v))
    # Channel-major copies: q and k may be views into a channels-last qkv map (a pixel's
    # channels 3C apart), which every product and sum below (and their backward and forward-mode
    # derivatives) would otherwise read strided or copy again, in float32 and float64. The
    # values are the same to the bit; measured at 2 x 256^2 on a 2-core CPU: a meta step 13-14%
    # and a plain one 9-11% faster (docs/benchmarks.md). Where a graph is recorded on the CPU,
    # the attention modules hand over q, k and v already channel-major
    # (_channel_major_where_recorded), and these copies only make each batch entry adjacent.
    if not torch.compiler.is_compiling():  # inductor picks its own layouts
        q, k = q.contiguous(), k.contiguous()
    attn = (_cosine_gram(q, k, wide).to(dtype) * temperature).softmax(dim=-1)
    return rearrange(attn @ v, "b head c (h w) -> b (head c) h w", head=heads, h=h, w=w)


def _projected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    temperature: Tensor,
    weight: Tensor,
    residual: Tensor,
    precise: bool = True,
) -> Tensor:
    """``residual + conv1x1(_transposed_attention(q, k, v, ...), weight)``: the attention, its
    output projection and the residual connection around it.

    Where a graph is recorded, exactly that. Where none is (inference), ``_banded_attention``:
    the same value by another order of operations, within float32 rounding of it.
    """
    if _records_graph(q, k, v, temperature, weight, residual):
        return residual + F.conv2d(_transposed_attention(q, k, v, heads, temperature, precise), weight)
    return _banded_attention(q, k, v, heads, temperature, weight, residual, precise)


def _banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    temperature: Tensor,
    weight: Tensor,
    residual: Tensor,
    precise: bool = True,
) -> Tensor:
    """The projected channel attention as three matrix products over pixel-major views, for inference.

    Three changes to the textbook order, each measured with ``benchmarks/fusion_speed.py``:

    1. The Gram matrix and the norms over all ``H*W`` pixels are summed in blocks of
       ``bands.BAND_PIXELS`` pixels by one batched product at the inputs' precision (float32),
       and the block sums added in the wide dtype (float64): blocked summation, as accurate here
       as a float64 sum (the released outputs within 1e-6) without float64 copies of ``q`` and
       ``k`` (``bands.ChannelAttentionSums``).
    2. The product covers all ``C x C`` channel pairs, of which the heads' diagonal blocks are
       kept: one well-shaped product in place of ``heads`` products of ``C/heads`` rows.
    3. The output projection is folded into the attention: ``W blockdiag(A) v`` as one
       ``C_out x C`` matrix applied to ``v`` by a product that adds the residual as it writes
       (``bands.mix_into``), so neither the attended values nor the projection are written out
       apart.

    Products run on views of the pixel-major (channels-last) or channel-major layout as given
    (no copies of float32 inputs), and the result keeps that layout. Measured on a 480 x 640 pair
    on 2 CPU cores: 1.7x less time for the whole network than the textbook order, eager or
    compiled (``docs/benchmarks.md``).
    """
    sums = ChannelAttentionSums(precise)
    sums.add(q, k)
    return mix_into(residual, v, sums.mixing(heads, temperature, weight, q.dtype))


def _cosine_gram(q: Tensor, k: Tensor, wide: torch.dtype) -> Tensor:
    """``normalize(q) normalize(k)^T`` over the last dimension, accumulated in ``wide``.

    Computed as the Gram matrix of the raw rows divided by the outer product of their norms
    (equal up to rounding; ``F.normalize``'s ``eps = 1e-12``), so no normalised full-size copy
    is made. Where a graph is recorded and ``wide`` is wider than the inputs, ``_WideCosineGram``
    keeps ``q`` and ``k`` at their own precision for the backward pass instead of the widened
    copies autograd would keep.
    """
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if recording and wide != q.dtype and not torch.compiler.is_compiling():
        cosine: Tensor = _WideCosineGram.apply(q, k, wide)[0]
        return cosine
    return _cosine_gram_forward(q.to(wide), k.to(wide))[0]


def _clamped_norm(rows: Tensor) -> Tensor:
    """The L2 norm of each row, at least ``F.normalize``'s ``eps``, as a column."""
    return torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(1e-12)


def _cosine_gram_forward(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The cosine Gram matrix of rows of ``q`` and ``k`` and the two clamped row norms."""
    norm_q, norm_k = _clamped_norm(q), _clamped_norm(k)
    return (q @ k.transpose(-2, -1)) / (norm_q * norm_k.transpose(-2, -1)), norm_q, norm_k


class _WideCosineGram(torch.autograd.Function):
    """``_cosine_gram_forward`` in a wider dtype, saving the narrow inputs only.

    Returns the cosine matrix ``c`` and the clamped norms ``n_q``, ``n_k`` (outputs, so that a
    second derivative reaches ``q`` and ``k`` through them too). Only the sums over all pixels
    (the Gram matrix, the norms, the forward-mode product's) are taken in the wide dtype; the
    backward's products sum over a few channels and run at the inputs' own precision. With a
    cotangent ``G`` of ``c`` and ``g_q`` of ``n_q``:
    ``dq = (G / (n_q n_k^T)) k + (g_q / n_q - (sum_j G c) / n_q^2) q``, symmetrically for ``k``
    (the second term vanishes where a norm is clamped at ``eps``). Written with differentiable
    operations, so ``create_graph=True`` gives second derivatives.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, wide: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return _cosine_gram_forward(q.to(wide), k.to(wide))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, torch.dtype], output: tuple[Tensor, ...]) -> None:
        q, k, wide = inputs
        ctx.wide = wide
        ctx.save_for_backward(q, k, *output)
        ctx.save_for_forward(q, k, *output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_norm_q: Tensor, grad_norm_k: Tensor) -> tuple[Tensor, Tensor, None]:
        q, k, cosine, norm_q, norm_k = ctx.saved_tensors
        grad = grad.to(ctx.wide)
        scaled = grad / (norm_q * norm_k.transpose(-2, -1))
        weighted = grad * cosine
        radial_q = _radial(grad_norm_q.to(ctx.wide) - weighted.sum(-1, keepdim=True) / norm_q, norm_q)
        radial_k = _radial(grad_norm_k.to(ctx.wide) - weighted.sum(-2).unsqueeze(-1) / norm_k, norm_k)
        grad_q = scaled.to(q.dtype) @ k + radial_q.to(q.dtype) * q
        grad_k = scaled.transpose(-2, -1).to(k.dtype) @ q + radial_k.to(k.dtype) * k
        return grad_q, grad_k, None

    @staticmethod
    def jvp(ctx: Any, dq: Tensor, dk: Tensor, _: None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, cosine, norm_q, norm_k = ctx.saved_tensors
        qw, kw, dqw, dkw = (t.to(ctx.wide) for t in (q, k, dq, dk))
        d_gram = dqw @ kw.transpose(-2, -1) + qw @ dkw.transpose(-2, -1)
        d_norm_q = _radial((qw * dqw).sum(-1, keepdim=True), norm_q)
        d_norm_k = _radial((kw * dkw).sum(-1, keepdim=True), norm_k)
        rates = d_norm_q / norm_q + (d_norm_k / norm_k).transpose(-2, -1)
        return d_gram / (norm_q * norm_k.transpose(-2, -1)) - cosine * rates, d_norm_q, d_norm_k


def _radial(coefficient: Tensor, norm: Tensor) -> Tensor:
    """``coefficient / norm`` where the norm is above the clamp, 0 where it is clamped."""
    return torch.where(norm > 1e-12, coefficient / norm, 0.0)


def _gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)``, with a bf16 view that is not dense on the CPU copied dense first.

    PyTorch's CPU GELU runs 8-10x slower on such a view (torch 2.15, 2 threads: half of a
    64-channel channels-last bf16 band, 2.5 ms against 0.27 ms with the copy), except where the
    view's channels are a multiple of 64 (0.46 against 0.58 ms). Each gate is such a view under
    bf16 autocast on the CPU (``fuse --bf16``, ``train --bf16``): the first half of a
    feed-forward's map. The values are the same either way. (float16 views are left alone:
    there the dense kernel rounds differently.)
    """
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not dense:
        x = x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    return F.gelu(x)


def _dwconv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


_ALL = slice(None)


def _in_bands(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether ``module`` runs band by band (``metaloss.fusion.bands``): for inputs worth it
    (``worth_banding``: large, channels-last, on the CPU, not inside ``whole_images``), at
    inference, where no graph is recorded and no forward-mode derivative is carried (the bands
    write in place), and not while ``torch.compile`` traces it (it fails to trace the bands)."""
    if torch.compiler.is_compiling() or not worth_banding(inputs[0]):
        return False
    tensors = (*inputs, *module.parameters())
    if _records_graph(*tensors):
        return False
    return all(forward_ad.unpack_dual(t).tangent is None for t in tensors)


class TransposedAttention(nn.Module):
    """Multi-head transposed self-attention (Restormer's MDTA)."""

    def __init__(self, dim: int, heads: int, precise: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.precise = precise
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = _dwconv(dim * 3)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def qkv_of(self, x: Tensor, rows: slice = _ALL) -> Tensor:
        """Queries, keys and values of ``x`` stacked on channels, at its ``rows`` (a band's own
        rows within its halo)."""
        return _channel_major_where_recorded(self.qkv_dwconv(self.qkv(x))[:, :, rows])

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + attention(x)``: the residual is added in the same pass at inference."""
        q, k, v = self.qkv_of(x).chunk(3, dim=1)
        weight = self.project_out.weight
        return _projected_attention(q, k, v, self.heads, self.temperature, weight, residual, self.precise)


class GatedFeedForward(nn.Module):
    """Gated depth-wise-conv feed-forward network (Restormer's GDFN)."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = _dwconv(hidden * 2)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor, rows: slice = _ALL) -> Tensor:
        """The network on ``x``, kept at its ``rows`` after the 3 x 3 convolution (a band's own
        rows within its halo)."""
        x1, x2 = self.dwconv(self.project_in(x))[:, :, rows].chunk(2, dim=1)
        return self.project_out(_gelu(x1) * x2)


class RestormerBlock(nn.Module):
    """``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    At inference (no graph recorded) a large channels-last image on the CPU runs in bands of
    rows (``metaloss.fusion.bands``): one pass for the attention's sums, one for the rest; the
    same values within float32 rounding.

    Examples:
        >>> import torch
        >>> block = RestormerBlock(dim=16, heads=8)
        >>> block(torch.rand(1, 16, 12, 12)).shape  # any height and width
        torch.Size([1, 16, 12, 12])
    """

    def __init__(self, dim: int, heads: int = 8, expansion: float = 2.0, precise: bool = True) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = TransposedAttention(dim, heads, precise)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GatedFeedForward(dim, expansion)

    def forward(self, x: Tensor) -> Tensor:
        if _in_bands(self, x):
            return self._forward_in_bands(x)
        x = self.attn(self.norm1(x), residual=x)
        return x + self.ffn(self.norm2(x))

    def _forward_in_bands(self, x: Tensor) -> Tensor:
        c, bands = x.shape[1], row_bands(x.shape[-2], band_rows(x.shape[-1], batch=x.shape[0]))
        attn = self.attn
        sums = ChannelAttentionSums(attn.precise)
        layout = memory_format_of(x)
        values, out = BandedTensor(x.shape[-2], layout), BandedTensor(x.shape[-2], layout)
        for band in bands:
            qk, v = attn.qkv_of(self.norm1(x[:, :, band.lo : band.hi]), band.core).split([2 * c, c], dim=1)
            sums.add_stacked(qk)
            values.write(v, band)
        mixing = sums.mixing(attn.heads, attn.temperature, attn.project_out.weight, x.dtype)
        for band in bands:
            y = mix_into(x[:, :, band.lo : band.hi], values.read(band), mixing)
            out.write_sum(y[:, :, band.core], self.ffn(self.norm2(y), band.core), band)
        return out.tensor


def _stage(num_blocks: int, dim: int, heads: int, expansion: float, precise: bool) -> nn.Sequential:
    """``num_blocks`` Restormer blocks in a row (children ``0``, ``1``, ... as in the release)."""
    return nn.Sequential(*(RestormerBlock(dim, heads, expansion, precise) for _ in range(num_blocks)))


def _run(module: nn.Module, *inputs: Tensor, checkpointed: bool) -> Tensor:
    """``module(*inputs)``; if ``checkpointed``, each block of a stage (or the module itself)
    with its activations recomputed in the backward pass (``checkpointed_call``)."""
    if not checkpointed:
        out: Tensor = module(*inputs)
        return out
    if not isinstance(module, nn.Sequential):
        out = checkpointed_call(module, *inputs)
        return out
    (x,) = inputs
    for block in module:
        x = checkpointed_call(block, x)
    return x


class AdaptiveFusion(nn.Module):
    """ReFusion's adaptive fusion module: cross transposed attention, then a gated merge.

    At inference (no graph recorded) a large image runs in bands of rows, as ``RestormerBlock``.
    """

    def __init__(self, dim: int = 16, heads: int = 8, precise: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.precise = precise
        self.temperature1 = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv1 = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv1_dwconv = _dwconv(dim * 3)
        self.qkv2 = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv2_dwconv = _dwconv(dim * 3)
        self.project_mid1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.project_mid2 = nn.Conv2d(dim, dim, 1, bias=False)
        self.project_E = nn.Conv2d(dim * 2, dim * 8, 1, bias=False)
        self.project_E_d = _dwconv(dim * 8)
        self.project_E1 = nn.Conv2d(dim, dim * 4, 1, bias=False)
        self.project_E1_d = _dwconv(dim * 4)
        self.project_E2 = nn.Conv2d(dim, dim * 4, 1, bias=False)
        self.project_E2_d = _dwconv(dim * 4)
        self.project_out1 = nn.Conv2d(dim * 4, dim * 2, 1, bias=False)
        self.project_out2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=False)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if _in_bands(self, x1, x2):
            return self._forward_in_bands(x1, x2)
        (q1, k1, v1), (q2, k2, v2) = self._qkv_of(x1, x2)
        # Each stream's values are re-weighted by the other stream's queries.
        x1 = _projected_attention(q2, k1, v1, self.heads, self.temperature1, self.project_mid1.weight, x1, self.precise)
        x2 = _projected_attention(q1, k2, v2, self.heads, self.temperature2, self.project_mid2.weight, x2, self.precise)
        first, second = self._merge_terms(x1, x2)
        return first + second

    def _qkv_of(self, x1: Tensor, x2: Tensor, rows: slice = _ALL) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Each stream's queries, keys and values, at ``rows`` (a band's own rows within its halo)."""
        qkv1 = _channel_major_where_recorded(self.qkv1_dwconv(self.qkv1(x1))[:, :, rows]).chunk(3, dim=1)
        qkv2 = _channel_major_where_recorded(self.qkv2_dwconv(self.qkv2(x2))[:, :, rows]).chunk(3, dim=1)
        return qkv1, qkv2

    def _merge_terms(self, x1: Tensor, x2: Tensor, rows: slice = _ALL) -> tuple[Tensor, Tensor]:
        """The gated merge of the two attended streams as two terms whose sum it is, kept at
        ``rows`` after the 3 x 3 convolutions (a band's own rows within its halo)."""
        out = torch.cat([x1, x2], dim=1)
        g1, g2 = self.project_E_d(self.project_E(out))[:, :, rows].chunk(2, dim=1)
        x1 = _gelu(g1) * self.project_E1_d(self.project_E1(x1))[:, :, rows]
        x2 = _gelu(g2) * self.project_E2_d(self.project_E2(x2))[:, :, rows]
        return out[:, :, rows] + self.project_out1(x1), self.project_out2(x2)

    def _forward_in_bands(self, x1: Tensor, x2: Tensor) -> Tensor:
        bands = row_bands(x1.shape[-2], band_rows(x1.shape[-1], batch=x1.shape[0]))
        sums1, sums2 = ChannelAttentionSums(self.precise), ChannelAttentionSums(self.precise)
        height, layout = x1.shape[-2], memory_format_of(x1)
        values1, values2, out = (BandedTensor(height, layout) for _ in range(3))
        for band in bands:
            (q1, k1, v1), (q2, k2, v2) = self._qkv_of(
                x1[:, :, band.lo : band.hi], x2[:, :, band.lo : band.hi], band.core
            )
            sums1.add(q2, k1)  # each stream's values re-weighted by the other stream's queries
            sums2.add(q1, k2)
            values1.write(v1, band)
            values2.write(v2, band)
        mixing1 = sums1.mixing(self.heads, self.temperature1, self.project_mid1.weight, x1.dtype)
        mixing2 = sums2.mixing(self.heads, self.temperature2, self.project_mid2.weight, x2.dtype)
        for band in bands:
            y1 = mix_into(x1[:, :, band.lo : band.hi], values1.read(band), mixing1)
            y2 = mix_into(x2[:, :, band.lo : band.hi], values2.read(band), mixing2)
            out.write_sum(*self._merge_terms(y1, y2, band.core), band)
        return out.tensor


class ReFusion(nn.Module):
    """The fusion network ``F``: ``(B, 2, H, W)`` (A, B luminance in [0, 1]) -> ``(B, 1, H, W)``.

    Args:
        dim: feature width per source (16).
        num_blocks: Restormer blocks per stage (2).
        heads: attention heads (8).
        expansion: FFN expansion (2).
        precise_attention: accumulate the attention's whole-image reductions in float64 for
            float32 inputs (reproduces the released outputs within 1e-5; ~16% slower at 640x480
            where a graph is recorded; at inference the float32 bands are summed in float64,
            at no measurable cost).
        checkpoint_blocks: where a graph is recorded, recompute each Restormer block's and the
            fusion module's activations in the backward pass instead of keeping them
            (``metaloss.checkpointed_call``, correct inside a meta step's virtual steps): the
            graph then holds the blocks' inputs only, for one more forward pass of the blocks.
            An attribute, so it can be switched at any time; not part of the weights.

    At inference (no graph recorded, and not under ``torch.compile``) the blocks run a large
    channels-last image on the CPU in bands of rows (``metaloss.fusion.bands``) and the attention
    in a faster order of the same arithmetic (``_banded_attention``), within float32 rounding of
    the training order.

    Examples:
        >>> import torch
        >>> fusion = ReFusion()
        >>> ir, vis = torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64)
        >>> fusion(torch.cat([ir, vis], dim=1)).shape
        torch.Size([1, 1, 48, 64])
    """

    def __init__(
        self,
        dim: int = 16,
        num_blocks: int = 2,
        heads: int = 8,
        expansion: float = 2.0,
        precise_attention: bool = True,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        p = precise_attention
        self.checkpoint_blocks = checkpoint_blocks
        self.project_in_1 = nn.Conv2d(1, dim, 3, padding=1, bias=False)
        self.project_in_2 = nn.Conv2d(1, dim, 3, padding=1, bias=False)
        self.encoder1 = _stage(num_blocks, dim, heads, expansion, p)
        self.encoder2 = _stage(num_blocks, dim, heads, expansion, p)
        self.FM = AdaptiveFusion(dim, heads, p)
        self.decoder = _stage(num_blocks, dim * 2, heads, expansion, p)
        self.project_out_0 = nn.Conv2d(dim * 2, dim, 3, padding=1, bias=False)
        self.project_out_1 = nn.Conv2d(dim, 1, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 2:
            raise ValueError(f"ReFusion takes (B, 2, H, W) = [A, B] stacked on channels, got {tuple(x.shape)}")
        c = self.checkpoint_blocks
        x1 = _run(self.encoder1, self.project_in_1(x[:, :1]), checkpointed=c)
        x2 = _run(self.encoder2, self.project_in_2(x[:, 1:]), checkpointed=c)
        out = _run(self.decoder, _run(self.FM, x1, x2, checkpointed=c), checkpointed=c)
        out = F.leaky_relu(self.project_out_0(out), 0.01)
        return torch.sigmoid(self.project_out_1(out))


class LossGenerator(nn.Module):
    """TDFusion's loss generation module ``G``: sources A, B -> weight maps ``(B, 2, H, W)``.

    Per source a 3x3 conv and Restormer blocks; concatenated; Restormer blocks at twice the
    width; 3x3 conv, PReLU, 3x3 conv to 2 channels (``logits(a, b)``); Softmax over the 2
    channels, so ``w_a + w_b = 1`` at every pixel (use it with ``LearnableLoss(...,
    weights="given")``).
    Called as ``generator(a, b)`` with ``(B, 1, H, W)`` sources. ``precise_attention`` and
    ``checkpoint_blocks`` as in ``ReFusion``.

    Examples:
        >>> import torch
        >>> generator = LossGenerator()
        >>> w = generator(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
        >>> w.shape, bool(torch.allclose(w.sum(dim=1), torch.ones(1, 32, 32)))  # ends in a softmax over the sources
        (torch.Size([1, 2, 32, 32]), True)
    """

    def __init__(
        self,
        dim: int = 16,
        num_blocks: int = 2,
        heads: int = 8,
        expansion: float = 2.0,
        precise_attention: bool = True,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        p = precise_attention
        self.checkpoint_blocks = checkpoint_blocks
        self.patch_embed1 = nn.Conv2d(1, dim, 3, padding=1, bias=False)
        self.patch_embed2 = nn.Conv2d(1, dim, 3, padding=1, bias=False)
        self.encoder1 = _stage(num_blocks, dim, heads, expansion, p)
        self.encoder2 = _stage(num_blocks, dim, heads, expansion, p)
        self.encoder3 = _stage(num_blocks, dim * 2, heads, expansion, p)
        self.out1 = nn.Conv2d(dim * 2, dim, 3, padding=1, bias=False)
        self.out2 = nn.PReLU()
        self.out3 = nn.Conv2d(dim, 2, 3, padding=1, bias=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.softmax(self.logits(a, b), dim=1)

    def logits(self, a: Tensor, b: Tensor) -> Tensor:
        """The maps before the softmax ``(B, 2, H, W)``: ``forward`` is their softmax over the
        sources. For a generator that adds logits of its own to these (a sum of logits, where
        ``log(forward(a, b))`` would lose the gradient of a saturated pixel)."""
        c = self.checkpoint_blocks
        a = _run(self.encoder1, self.patch_embed1(a), checkpointed=c)
        b = _run(self.encoder2, self.patch_embed2(b), checkpointed=c)
        out = _run(self.encoder3, torch.cat([a, b], dim=1), checkpointed=c)
        logits: Tensor = self.out3(self.out2(self.out1(out)))
        return logits


def load_released_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load the authors' released ``.pth`` (ReFusion or TDFusion) into ``model``.

    The release stores every conv weight twice (``x.weight`` and ``x.conv.weight``, one tensor)
    and LayerNorm as ``norm.body.weight``; both are mapped. Our own checkpoints (a
    ``MetaTrainer`` checkpoint's ``"model"`` entry, or a plain state dict) load too.

    The file is read with ``weights_only=True`` (``metaloss.checkpoint.load_weights_file``):
    a file whose pickle would run code is refused, never opened.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file asks to build objects or run code (a ``ValueError``).
        ValueError: not a PyTorch file, or its keys do not fit ``model`` (a few are named).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metaloss import save_checkpoint
        >>> path = save_checkpoint({"model": ReFusion().state_dict()}, Path(tempfile.mkdtemp()) / "f.pt")
        >>> fusion = load_released_weights(ReFusion(), path)  # or "ReFusion_IVIF.pth", the authors' file
        >>> load_released_weights(LossGenerator(), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    state = load_weights_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a MetaTrainer checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items() if ".conv." not in k}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold network weights (its entries are not all tensors)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {str(err).splitlines()[-1].strip()[:200]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit {type(model).__name__} ({len(missing)} of its weights missing, {len(unexpected)} "
            f"unknown; e.g. missing {missing[:3]}, unknown {unexpected[:3]}): is it a checkpoint of another network?"
        )
    return model
