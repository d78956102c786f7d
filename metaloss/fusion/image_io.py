"""Reading and writing images exactly as the TDFusion reference pipeline does (OpenCV).

- grey: ``round(cvtColor(imread(p).astype(float32), BGR2GRAY))`` on the 0-255 scale;
- luminance for colour fusion: the Y of OpenCV's YCrCb on the float 0-255 image, with its CrCb
  kept for re-colouring. For float images OpenCV centres the chroma at ``CHROMA_MID`` = 0.5
  whatever the range (``Cr = (R - Y) * 0.713 + 0.5``), not at 128;
- colour of the fused image (``fused_chroma``): the chroma of the one colour source, or the
  saturation-weighted blend of both; none when both sources are grey (three equal channels).

An infrared image stored as three identical channels reads as its single channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "CHROMA_MID",
    "IMAGE_SUFFIXES",
    "blend_chroma",
    "fused_chroma",
    "has_colour",
    "is_colour",
    "read_bgr",
    "read_grey",
    "read_ycrcb",
    "to_ycrcb",
    "write_grey",
    "write_ycrcb_as_rgb",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

CHROMA_MID = 0.5
"""The neutral chroma of OpenCV's YCrCb on float images (its ``delta``), for any value range."""


def read_bgr(path: str | os.PathLike[str]) -> np.ndarray:
    """``cv2.imread`` as float32 ``(H, W, 3)`` BGR on 0-255.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable (or is a truncated) image.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "vis.png"
        >>> cv2.imwrite(str(path), np.full((4, 6, 3), (255, 0, 0), np.uint8))  # blue
        True
        >>> image = read_bgr(path)
        >>> image.shape, image.dtype, image[0, 0]
        ((4, 6, 3), dtype('float32'), array([255.,   0.,   0.], dtype=float32))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"{path} is not a readable image (unknown format, empty or truncated)")
    if path.suffix.lower() in (".jpg", ".jpeg") and not data[-2:].tobytes() == b"\xff\xd9":
        raise ValueError(f"{path} is a truncated JPEG (no end-of-image marker)")
    return image.astype(np.float32)


def read_grey(path: str | os.PathLike[str]) -> np.ndarray:
    """The reference grey image: ``round(BGR2GRAY(float BGR))``, float32 ``(H, W)`` on 0-255.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "vis.png"
        >>> cv2.imwrite(str(path), np.full((4, 6, 3), (255, 0, 0), np.uint8))  # blue
        True
        >>> float(read_grey(path)[0, 0])  # round(0.114 * 255)
        29.0
    """
    return np.round(cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2GRAY)).astype(np.float32)


def to_ycrcb(bgr: np.ndarray) -> np.ndarray:
    """OpenCV YCrCb of a float BGR image, ``(H, W, 3)`` float32, Y on 0-255 (chroma about 0.5).

    Examples:
        >>> ycrcb = to_ycrcb(np.full((2, 2, 3), 200.0, np.float32))
        >>> ycrcb[0, 0]
        array([200. ,   0.5,   0.5], dtype=float32)
    """
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb)


def read_ycrcb(path: str | os.PathLike[str]) -> np.ndarray:
    """``to_ycrcb`` of the image at ``path``.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "vis.png"
        >>> cv2.imwrite(str(path), np.full((4, 6, 3), 128, np.uint8))
        True
        >>> read_ycrcb(path)[0, 0]  # Y on 0-255, neutral chroma at CHROMA_MID
        array([128. ,   0.5,   0.5], dtype=float32)
    """
    return to_ycrcb(read_bgr(path))


def has_colour(bgr: np.ndarray) -> bool:
    """Whether a ``(H, W, 3)`` image has distinct colour channels (grey stored as RGB has not).

    Examples:
        >>> green = np.dstack([np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2))])
        >>> has_colour(np.full((2, 2, 3), 90.0)), has_colour(green)
        (False, True)
    """
    return not (np.array_equal(bgr[..., 0], bgr[..., 1]) and np.array_equal(bgr[..., 1], bgr[..., 2]))


def is_colour(path: str | os.PathLike[str]) -> bool:
    """``has_colour`` of the image at ``path``.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "ir.png"
        >>> cv2.imwrite(str(path), np.full((4, 6, 3), 90, np.uint8))  # grey stored as three channels
        True
        >>> is_colour(path)
        False
    """
    return has_colour(read_bgr(path))


def blend_chroma(c1: np.ndarray, c2: np.ndarray, mid: float = CHROMA_MID, eps: float = 1e-4) -> np.ndarray:
    """Blend two chroma planes, favouring the more saturated one at each pixel.

    ``Cf = (C1 |C1 - m| + C2 |C2 - m|) / (|C1 - m| + |C2 - m| + eps)``; ``m`` is the chroma
    mid-point: ``CHROMA_MID`` for ``read_ycrcb``'s planes.

    Examples:
        >>> blend_chroma(np.array([0.5, 0.9]), np.array([0.7, 0.5])).round(3)  # one plane neutral: the other wins
        array([0.7, 0.9])
    """
    d1, d2 = np.abs(c1 - mid), np.abs(c2 - mid)
    return (c1 * d1 + c2 * d2) / (d1 + d2 + eps)


def fused_chroma(ycrcb_a: np.ndarray, colour_a: bool, ycrcb_b: np.ndarray, colour_b: bool) -> np.ndarray | None:
    """The fused image's CrCb ``(H, W, 2)``: the colour source's, a blend of both, or ``None``.

    Args:
        ycrcb_a: ``read_ycrcb`` of the first source.
        colour_a: ``has_colour`` of the first source (a grey image has no chroma to keep).
        ycrcb_b: ``read_ycrcb`` of the second source.
        colour_b: ``has_colour`` of the second source.

    Examples:
        >>> grey, red = np.full((2, 2, 3), 128.0, np.float32), np.zeros((2, 2, 3), np.float32)
        >>> red[..., 2] = 255.0  # BGR
        >>> fused = fused_chroma(to_ycrcb(grey), has_colour(grey), to_ycrcb(red), has_colour(red))
        >>> bool(np.array_equal(fused, to_ycrcb(red)[..., 1:]))  # the one colour source's chroma
        True
        >>> fused_chroma(to_ycrcb(grey), False, to_ycrcb(grey), False) is None  # two grey sources: no colour
        True
    """
    if colour_a and colour_b:
        return blend_chroma(ycrcb_a[..., 1:], ycrcb_b[..., 1:])
    if colour_a or colour_b:
        return (ycrcb_a if colour_a else ycrcb_b)[..., 1:]
    return None


def write_grey(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a 0-255 float or uint8 image as an 8-bit grey PNG (clipped, rounded).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "fused.png"
        >>> write_grey(path, np.array([[-3.0, 127.6, 300.0]]))  # clipped to 0-255 and rounded
        >>> cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        array([[  0, 128, 255]], dtype=uint8)
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.clip(np.round(image), 0, 255).astype(np.uint8)):
        raise OSError(f"could not write {path}")


def write_ycrcb_as_rgb(path: str | os.PathLike[str], y: np.ndarray, crcb: np.ndarray) -> None:
    """Write fused luminance ``y`` (0-255) with chroma ``crcb`` ``(H, W, 2)`` as a colour PNG.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "rgb" / "fused.png"
        >>> write_ycrcb_as_rgb(path, np.full((2, 2), 128.0), np.full((2, 2, 2), 0.5))  # neutral chroma: grey
        >>> cv2.imread(str(path))[0, 0]
        array([128, 128, 128], dtype=uint8)
    """
    ycrcb = np.concatenate([y[..., None], crcb], axis=2).astype(np.float32)
    bgr = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.clip(np.round(bgr), 0, 255).astype(np.uint8)):
        raise OSError(f"could not write {path}")
