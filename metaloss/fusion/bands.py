"""Inference in row bands: the pieces that let Restormer blocks run a large image band by band.

A Restormer block's layers are local (LayerNorm, 1 x 1 and depth-wise 3 x 3 convolutions, the
gate) except its channel attention, which needs two sums over the whole image (the Gram matrix
of the queries and keys, and their norms) before any output pixel can be formed. So at
inference a block runs in two passes over bands of rows, each band with a one-row halo on either
side for the 3 x 3 convolutions:

1. per band, the layers up to ``q, k, v``; the band's share of the sums is added to a
   ``ChannelAttentionSums`` and its ``v`` kept;
2. the attention as one mixing matrix (``ChannelAttentionSums.mixing``), then per band the
   attention's output (``mix_into``) and the layers after it.

Every layer but the attention sums sees exactly the arithmetic of the whole image (the halo rows
are computed, used for the convolution and dropped), and the sums are blocked sums either way,
so a band's pixels come out as the whole image's within float32 rounding (ReFusion's released
weights on a 480 x 640 pair: within 5e-7 of the training order). What changes is where the data
lives: the wide intermediate maps of one band (up to 128 channels) stay in the CPU's caches
instead of streaming full-resolution tensors through memory between layers (``docs/benchmarks.md``:
24% less time for ReFusion at 480 x 640 on 2 CPU cores).

Bands are for inference only: where a graph is recorded, or a forward-mode derivative carried,
the networks run on whole tensors (``networks._in_bands``).

References:
    Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BAND_PIXELS",
    "MIN_BANDED_PIXELS",
    "ROW_BAND_PIXELS",
    "BandedTensor",
    "ChannelAttentionSums",
    "RowBand",
    "band_rows",
    "banded_sum",
    "memory_format_of",
    "mix_into",
    "pixel_rows",
    "row_bands",
    "whole_images",
    "worth_banding",
]

BAND_PIXELS = 4096
"""Pixels per block of the attention's whole-image sums (each block summed at float32)."""

ROW_BAND_PIXELS = 5 * BAND_PIXELS
"""About how many pixels a band of rows holds over the whole batch (``band_rows``): 32 rows of one
640-pixel-wide image, the fastest of 8 to 480 rows for ReFusion at 480 x 640 on 2 CPU cores
(``docs/benchmarks.md``)."""

MIN_BANDED_PIXELS = 4 * ROW_BAND_PIXELS
"""The smallest image (in pixels) worth running in bands (``worth_banding``): 81,920, between
256 x 256 (9% slower in bands, measured) and 320 x 320 (5-9% faster)."""


@dataclass(frozen=True)
class RowBand:
    """Rows ``[start, stop)`` of an image, read with a halo: rows ``[lo, hi)``.

    ``lo`` is ``start - 1`` and ``hi`` is ``stop + 1`` where the image has those rows (a 3 x 3
    convolution's zero padding stands in for them at the image's borders).

    Examples:
        >>> band = RowBand(start=4, stop=8, lo=3, hi=9)
        >>> band.core  # rows 4-7 within the rows 3-8 read
        slice(1, 5, None)
    """

    start: int
    stop: int
    lo: int
    hi: int

    @property
    def core(self) -> slice:
        """The band's own rows within the ``[lo, hi)`` rows read."""
        return slice(self.start - self.lo, self.stop - self.lo)


def row_bands(height: int, rows: int) -> list[RowBand]:
    """``height`` rows cut into bands of ``rows`` (the last one shorter), each with its halo.

    Examples:
        >>> [(b.start, b.stop, b.lo, b.hi) for b in row_bands(5, 2)]
        [(0, 2, 0, 3), (2, 4, 1, 5), (4, 5, 3, 5)]
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    return [
        RowBand(start, min(height, start + rows), max(0, start - 1), min(height, start + rows + 1))
        for start in range(0, height, rows)
    ]


def band_rows(width: int, pixels: int = ROW_BAND_PIXELS, *, batch: int = 1) -> int:
    """Rows per band for a batch of ``batch`` images ``width`` pixels wide: ``pixels / (batch *
    width)``, rounded up, so that a band holds about ``pixels`` pixels whatever the batch (a
    batch of 4 pairs of 512 x 512 took 15% less time a pair this way than with bands of 40 rows
    of each image, ``docs/benchmarks.md``).

    Examples:
        >>> band_rows(640), band_rows(1024), band_rows(50_000), band_rows(512, batch=4)
        (32, 20, 1, 10)
    """
    return max(1, -(-pixels // (batch * width)))


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last ``(B, C, H, W)`` tensor, else contiguous.

    Examples:
        >>> import torch
        >>> memory_format_of(torch.rand(1, 3, 4, 5).contiguous(memory_format=torch.channels_last))
        torch.channels_last
        >>> memory_format_of(torch.rand(1, 3, 4, 5))
        torch.contiguous_format
    """
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


_WHOLE_IMAGES: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_images", default=False)


@contextlib.contextmanager
def whole_images() -> Iterator[None]:
    """Inside, no block runs in bands: every layer sees whole tensors, as where a graph is
    recorded (to compare, or where bands do not pay on a machine). Per thread and per task.

    Examples:
        >>> import torch
        >>> image = torch.rand(1, 16, 480, 640).contiguous(memory_format=torch.channels_last)
        >>> with whole_images():
        ...     worth_banding(image)
        False
        >>> worth_banding(image)
        True
    """
    token = _WHOLE_IMAGES.set(True)
    try:
        yield
    finally:
        _WHOLE_IMAGES.reset(token)


def worth_banding(x: Tensor) -> bool:
    """Whether a block's ``(B, C, H, W)`` input is worth running in bands: on the CPU,
    channels-last, at least ``MIN_BANDED_PIXELS`` pixels, and not inside ``whole_images``.

    Bands keep a CPU's caches warm between layers; on a GPU they would only multiply the kernel
    launches (each layer once a band: 15 times at 480 x 640), and they have not been measured
    there, so GPU tensors run whole.

    In the channel-major layout a band of rows is a strided piece of every channel's plane, and
    ReFusion in bands was slower than on the whole image at every size measured (128^2 to
    1024^2, 4-35%); in channels-last it was faster from 320 x 320 on (5% to 21% at 1024^2),
    slower at 256 x 256, where the maps fit the caches anyway (``docs/benchmarks.md``).

    Examples:
        >>> import torch
        >>> image = torch.rand(1, 16, 480, 640)
        >>> worth_banding(image), worth_banding(image.contiguous(memory_format=torch.channels_last))
        (False, True)
        >>> worth_banding(torch.rand(1, 16, 256, 256).contiguous(memory_format=torch.channels_last))
        False
    """
    large = x.shape[-2] * x.shape[-1] >= MIN_BANDED_PIXELS
    cpu_nhwc = x.device.type == "cpu" and memory_format_of(x) == torch.channels_last
    return large and cpu_nhwc and not _WHOLE_IMAGES.get()


class BandedTensor:
    """A ``(B, C, H, W)`` tensor written band by band and read back with halos.

    Allocated on the first write, with the band's batch, channels, dtype and device, in the
    ``memory_format`` given. Where a single band covers all ``H`` rows, the band itself is kept,
    without a copy.

    Examples:
        >>> import torch
        >>> image = torch.arange(10.0).view(1, 1, 5, 2)
        >>> banded = BandedTensor(5, torch.contiguous_format)
        >>> for band in row_bands(5, 2):
        ...     banded.write(image[:, :, band.start : band.stop], band)
        >>> torch.equal(banded.tensor, image), banded.read(row_bands(5, 2)[1]).shape
        (True, torch.Size([1, 1, 4, 2]))
    """

    def __init__(self, height: int, memory_format: torch.memory_format) -> None:
        self.height = height
        self.memory_format = memory_format
        self._tensor: Tensor | None = None

    @property
    def tensor(self) -> Tensor:
        """The whole tensor (after the writes)."""
        if self._tensor is None:
            raise RuntimeError("BandedTensor.tensor before any write")
        return self._tensor

    def _rows(self, band: RowBand, like: Tensor, dtype: torch.dtype) -> Tensor:
        """The band's rows of the whole tensor, allocated on the first call like ``like``."""
        if self._tensor is None:
            b, c, _, w = like.shape
            self._tensor = torch.empty(
                (b, c, self.height, w), dtype=dtype, device=like.device, memory_format=self.memory_format
            )
        return self._tensor[:, :, band.start : band.stop]

    def write(self, values: Tensor, band: RowBand) -> None:
        """Store ``values`` (``(B, C, stop - start, W)``) as the band's rows."""
        if band.stop - band.start == self.height:
            self._tensor = values
        else:
            self._rows(band, values, values.dtype).copy_(values)

    def write_sum(self, a: Tensor, b: Tensor, band: RowBand) -> None:
        """Store ``a + b`` as the band's rows, written where they belong (no temporary)."""
        if band.stop - band.start == self.height:
            self._tensor = a + b
        else:
            torch.add(a, b, out=self._rows(band, a, torch.result_type(a, b)))

    def read(self, band: RowBand) -> Tensor:
        """The rows the band reads, halo included (a view)."""
        return self.tensor[:, :, band.lo : band.hi]


def pixel_rows(t: Tensor) -> Tensor:
    """``(B, C, H, W)`` as ``(B, H*W, C)``: a view for either memory layout (rows of a
    channels-last tensor included).

    Examples:
        >>> import torch
        >>> x = torch.rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        >>> rows = pixel_rows(x[:, :, 1:3])  # two rows of a channels-last tensor
        >>> rows.shape, rows.data_ptr() == x[:, :, 1:3].data_ptr()  # a view, no copy
        (torch.Size([2, 10, 3]), True)
    """
    return t.permute(0, 2, 3, 1).flatten(1, 2)


def banded_sum(product: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, wide: torch.dtype) -> Tensor:
    """``product(x, y)`` of ``(B, P, C)`` pixel rows, taken over blocks of ``BAND_PIXELS`` rows
    (and the remainder) at the inputs' precision, the block results summed in ``wide``.

    ``product`` sums over the pixel dimension (``-2``) and keeps leading batch dimensions.

    Examples:
        >>> import torch
        >>> x = torch.rand(1, 10_000, 3)
        >>> total = banded_sum(lambda a, _: a.sum(-2), x, x, torch.float64)  # 2 blocks and a remainder
        >>> total.dtype, bool(torch.allclose(total, x.double().sum(1)))
        (torch.float64, True)
    """
    pixels = x.shape[1]
    full = pixels // BAND_PIXELS * BAND_PIXELS
    blocks = product(*(t[:, :full].unflatten(1, (full // BAND_PIXELS, BAND_PIXELS)) for t in (x, y)))
    return blocks.to(wide).sum(1) + product(x[:, full:], y[:, full:]).to(wide)


def _gram(x: Tensor, y: Tensor) -> Tensor:
    return x.transpose(-2, -1) @ y


def _squared_norms(x: Tensor, _: Tensor) -> Tensor:
    # vector_norm, not square().sum(): 30% faster on a band, but it rounds differently, and every
    # trained number of the demo moved with it (62.1 against 43.1 mIoU became 64.4 against 41.4).
    return torch.linalg.vector_norm(x, dim=-2).square()


class ChannelAttentionSums:
    """Running whole-image sums of the channel attention: ``q^T k`` over all ``C x C`` channel
    pairs and the squared norms of each channel of ``q`` and ``k``.

    Each call to ``add`` sums its pixels in blocks of ``BAND_PIXELS`` at the inputs' precision
    (float32 for float32 or lower) and adds the block sums in ``wide`` (float64 for float32
    inputs when ``precise``): blocked summation, as accurate here as a float64 sum without
    float64 copies of ``q`` and ``k``. Autocast is off inside, so the sums keep that precision.

    Args:
        precise: sum the blocks in the wide dtype (else at the inputs' precision throughout).

    Examples:
        >>> import torch
        >>> q, k, v = torch.rand(3, 1, 16, 40, 30).unbind(0)
        >>> sums = ChannelAttentionSums()
        >>> for rows in (slice(0, 25), slice(25, 40)):  # two bands of rows
        ...     sums.add(q[:, :, rows], k[:, :, rows])
        >>> identity = torch.eye(16)[..., None, None]  # a 1 x 1 projection that leaves the channels
        >>> mixing = sums.mixing(heads=8, temperature=torch.ones(8, 1, 1), weight=identity, dtype=q.dtype)
        >>> mixing.shape  # the attention of 8 heads of 2 channels, the identity projection after it
        torch.Size([1, 16, 16])
        >>> out = mix_into(v, v, mixing)  # v + attention(v), per pixel
        >>> out.shape
        torch.Size([1, 16, 40, 30])
    """

    def __init__(self, precise: bool = True) -> None:
        self.precise = precise
        self.gram: Tensor | None = None
        self.norm_q: Tensor | None = None
        self.norm_k: Tensor | None = None

    def _dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The dtype of each block's product and of the sum over blocks, for inputs of ``dtype``."""
        if not self.precise:
            return dtype, dtype
        wide = torch.float64 if dtype == torch.float32 else torch.promote_types(dtype, torch.float32)
        return torch.promote_types(dtype, torch.float32), wide

    def _accumulate(self, gram: Tensor, norm_q: Tensor, norm_k: Tensor) -> None:
        if self.gram is None or self.norm_q is None or self.norm_k is None:
            self.gram, self.norm_q, self.norm_k = gram, norm_q, norm_k
        else:
            self.gram += gram
            self.norm_q += norm_q
            self.norm_k += norm_k

    def add(self, q: Tensor, k: Tensor) -> None:
        """Add the pixels of ``q`` and ``k`` (``(B, C, h, w)``, any layout) to the sums."""
        block, wide = self._dtypes(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            q_rows, k_rows = (pixel_rows(t).to(block) for t in (q, k))
            self._accumulate(
                banded_sum(_gram, q_rows, k_rows, wide),
                banded_sum(_squared_norms, q_rows, q_rows, wide),
                banded_sum(_squared_norms, k_rows, k_rows, wide),
            )

    def add_stacked(self, qk: Tensor) -> None:
        """``add(q, k)`` for ``qk``, ``q`` and ``k`` stacked on channels (``(B, 2C, h, w)``): one
        product per block over all ``2C x 2C`` channel pairs, whose off-diagonal block is
        ``q^T k`` and whose diagonal holds the squared norms: one product per block in place
        of three.
        """
        block, wide = self._dtypes(qk.dtype)
        c = qk.shape[1] // 2
        with torch.autocast(qk.device.type, enabled=False):
            rows = pixel_rows(qk).to(block)
            gram = banded_sum(_gram, rows, rows, wide)
        squares = gram.diagonal(dim1=-2, dim2=-1)
        self._accumulate(gram[:, :c, c:], squares[:, :c], squares[:, c:])

    def mixing(self, heads: int, temperature: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """The attention and its output projection as one ``(B, C_out, C)`` matrix ``W blockdiag(A)``.

        ``A`` holds each head's ``softmax(cosine(q, k) * t)`` over its ``C / heads`` channels
        (the cosines from the sums; norms clamped at ``F.normalize``'s ``eps``), ``W`` is the
        ``(C_out, C, 1, 1)`` weight of the 1 x 1 projection.
        """
        if self.gram is None or self.norm_q is None or self.norm_k is None:
            raise RuntimeError("ChannelAttentionSums.mixing before any add")
        b, c, _ = self.gram.shape
        norm_q, norm_k = (n.sqrt().clamp_min(1e-12) for n in (self.norm_q, self.norm_k))
        cosine = self.gram / (norm_q.unsqueeze(-1) * norm_k.unsqueeze(-2))
        per_head = c // heads
        blocks = cosine.view(b, heads, per_head, heads, per_head).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        attn = (blocks.to(dtype) * temperature).softmax(dim=-1)  # (B, heads, C/heads, C/heads)
        return torch.einsum("ohc,bhcd->bohd", weight.view(-1, heads, per_head), attn).flatten(2)


def mix_into(residual: Tensor, v: Tensor, mixing: Tensor) -> Tensor:
    """``residual + mixing v`` per pixel (``mixing`` from ``ChannelAttentionSums.mixing``), as one
    product that adds the residual as it writes (``baddbmm``), in ``v``'s layout.

    Examples:
        >>> import torch
        >>> v = torch.rand(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
        >>> out = mix_into(torch.zeros(1, 4, 3, 5), v, 2 * torch.eye(4)[None])
        >>> bool(torch.allclose(out, 2 * v)), out.is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """
    b, c, h, w = v.shape
    if v.stride(1) == 1:  # channels-last: pixels are rows
        out = torch.baddbmm(pixel_rows(residual), pixel_rows(v), mixing.transpose(-2, -1))
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)
    return torch.baddbmm(residual.reshape(b, -1, h * w), mixing, v.reshape(b, c, h * w)).view(b, -1, h, w)
