"""``run.py fuse``: fuse a pair or two folders with our checkpoint, the authors' released weights
or an exported ONNX file; grey output (and colour where a source has it)."""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metaloss.fusion.export import OnnxFusion
from metaloss.fusion.image_io import fused_chroma, has_colour, read_bgr, to_ycrcb, write_grey, write_ycrcb_as_rgb

from ..catalog import matched_names
from ..data import PairFiles
from ..networks import load_fusion_network
from ..options import add_device_option
from ..study import fuse_arrays

__all__ = ["add_parser", "fuse", "stretch"]


def stretch(raw: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0-255, as the released inference saves its images."""
    lo, hi = float(raw.min()), float(raw.max())
    return (raw - lo) / (hi - lo + 1e-12) * 255.0


def fuse(args: argparse.Namespace) -> Path:
    """Fuse one pair or two folders with our checkpoint, the authors' released weights, or (with
    ``--backend onnxruntime``) an exported ONNX file."""
    device = torch.device(args.device if args.backend == "torch" else "cpu")
    try:
        if args.backend == "onnxruntime":
            model: Any = OnnxFusion(args.weights)
        else:
            # Channels-last: the LayerNorms over channels read contiguous rows without their two
            # permutes, and oneDNN picks NHWC kernels (ReFusion, 480 x 640 on 2 CPU cores: 0.86 s
            # against 1.10 s a pair, within 5e-7 of the default layout). Without a graph the
            # blocks also run in bands of rows (metaloss.fusion.bands): 0.58 s against 0.76 s on
            # the whole image, in a later run on another machine (docs/benchmarks.md).
            model = load_fusion_network(args.weights).to(device).eval().to(memory_format=torch.channels_last)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--weights: {err}") from None
    out = Path(args.out)
    a, b = Path(args.a), Path(args.b)
    pairs = [PairFiles(a.stem, a, b)] if a.is_file() else matched_names(a, b)
    # Decoding the next pair and encoding the last one run in threads beside the network (OpenCV
    # releases the GIL), so a folder costs about the network's time per pair.
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes: collections.deque[Future[None]] = collections.deque()
        for pair, bgr_a, bgr_b in tqdm(read_ahead(pool, pairs), total=len(pairs), desc="fuse", disable=args.quiet):
            ya, yb = to_ycrcb(bgr_a), to_ycrcb(bgr_b)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # opt-in lower precision
                raw = fuse_arrays(model, ya[..., 0], yb[..., 0], device)
            crcb = fused_chroma(ya, has_colour(bgr_a), yb, has_colour(bgr_b))
            writes.append(pool.submit(write_outputs, out, pair.name, raw, crcb, args.raw))
            while len(writes) > 2:  # a bounded backlog; a failed write stops the run here
                writes.popleft().result()
        for write in writes:
            write.result()
    return out


def read_pair(pair: PairFiles) -> tuple[PairFiles, np.ndarray, np.ndarray]:
    """The pair's two images (BGR, as read); a size mismatch names both files."""
    bgr_a, bgr_b = read_bgr(pair.a), read_bgr(pair.b)
    if bgr_a.shape[:2] != bgr_b.shape[:2]:
        raise SystemExit(f"{pair.a} and {pair.b} differ in size: {bgr_a.shape[:2]} vs {bgr_b.shape[:2]}")
    return pair, bgr_a, bgr_b


def read_ahead(
    pool: ThreadPoolExecutor, pairs: Sequence[PairFiles], depth: int = 1
) -> Iterator[tuple[PairFiles, np.ndarray, np.ndarray]]:
    """``read_pair`` of each pair in order, the next ``depth`` read in ``pool`` meanwhile."""
    pending: collections.deque[Future[tuple[PairFiles, np.ndarray, np.ndarray]]] = collections.deque()
    for pair in pairs:
        pending.append(pool.submit(read_pair, pair))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_outputs(out: Path, name: str, raw: np.ndarray, crcb: np.ndarray | None, keep_raw: bool) -> None:
    """``<name>.png`` (grey, stretched), ``<name>.npy`` (``keep_raw``) and ``rgb/<name>.png``
    (where a source has colour)."""
    grey = stretch(raw)
    write_grey(out / f"{name}.png", grey)
    if keep_raw:
        np.save(out / f"{name}.npy", raw.astype(np.float32))
    if crcb is not None:
        write_ycrcb_as_rgb(out / "rgb" / f"{name}.png", grey, crcb)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``fuse`` on the subparsers ``sub``."""
    p = sub.add_parser("fuse", help="fuse a pair or two folders with a checkpoint (ours or the authors' .pth)")
    p.add_argument(
        "--weights",
        required=True,
        help="our last.pt or fusion.safetensors (ReFusion, or --ablation V's weighted sum) or a released .pth: "
        "ReFusion_IVIF.pth "
        "(--a infrared, --b visible), ReFusion_MIF.pth (--a CT/PET/SPECT, --b MRI), ReFusion_MFIF.pth "
        "(--a near focus, --b far focus), ReFusion_MEIF.pth (--a under-exposed, --b over-exposed)",
    )
    p.add_argument("--a", required=True, help="first source image or folder (infrared for IVIF; see --weights)")
    p.add_argument("--b", required=True, help="second source image or folder, names matched by stem (visible for IVIF)")
    p.add_argument("--out", required=True, help="output folder: <name>.png grey (stretched to 0-255), rgb/<name>.png")
    p.add_argument("--raw", action="store_true", help="also write <name>.npy, the float32 network output")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="torch (a .pt/.pth/.safetensors checkpoint) or onnxruntime (an .onnx file from `export`; CPU)",
    )
    add_device_option(p)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="torch backend: bf16 autocast (opt-in; on a 2-core CPU with AMX 0.54 s per 480x640 pair "
        "end to end against 0.66 s in float32; on the "
        "released MSRS pairs the raw output moved by 1.6e-2 at most, 1e-3 on average, on the 0-1 scale; "
        "see docs/benchmarks.md)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=fuse)
    return p
