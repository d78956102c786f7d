"""Fusion inference: the eager ReFusion (the reference) against faster variants, side by side.

One pair at 480 x 640 with the released infrared-visible weights (or random weights when the
shared data is absent). Each variant's median time over ``--repeats`` calls, its speed-up over
the eager reference measured in the same run, and its largest difference from the reference's
output (the target is 1e-5 at the default precision).

The reference is the straightforward eager network in a process with glibc's default ``malloc``
(as the released implementation runs), its channel attention in the textbook order that
``ReFusion`` keeps for training (``textbook_attention``): it is timed first, in a child process. Every other
variant runs in this process with ``metaloss.allocator.retain_freed_memory()`` applied, as
``run.py`` applies it (``--malloc default`` leaves this process's allocator alone too).

    python benchmarks/fusion_speed.py --threads 2

``--folder N`` also times the ``fuse`` command end to end (decoding, network, stretching and
encoding, the images read ahead and written behind in threads) over a folder of ``N`` copies of
a released MSRS test pair, per pair, beside the network alone on the same backend.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from malloc_option import add_malloc_option, apply_malloc_option
from timing import median_seconds
from torch import Tensor

from metaloss.fusion import ReFusion, load_released_weights, networks
from metaloss.fusion.bands import whole_images

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = DATA / "ReFusion" / "ReFusion_IVIF.pth"
MSRS_PAIR = (DATA / "MSRS" / "test" / "ir" / "00055D.png", DATA / "MSRS" / "test" / "vi" / "00055D.png")


def network(precise_attention: bool = True) -> torch.nn.Module:
    model = ReFusion(precise_attention=precise_attention)
    return (load_released_weights(model, WEIGHTS) if WEIGHTS.is_file() else model).eval()


@contextlib.contextmanager
def textbook_attention() -> Iterator[None]:
    """Inside: ``ReFusion`` in the order it keeps where a graph is recorded: whole images
    (``bands.whole_images``) and the attention as one float64 Gram product per head, the output
    projection after, instead of its inference order (``networks._banded_attention``): the
    straightforward network, as the reference runs it."""

    def textbook(
        q: Tensor, k: Tensor, v: Tensor, heads: int, t: Tensor, w: Tensor, res: Tensor, precise: bool
    ) -> Tensor:
        return res + F.conv2d(networks._transposed_attention(q, k, v, heads, t, precise), w)

    with whole_images(), mock.patch.object(networks, "_projected_attention", textbook):
        yield


def in_bands_of(rows: int) -> Callable[[], contextlib.AbstractContextManager[object]]:
    """A context inside which the blocks run in bands of ``rows`` rows, whatever the width."""
    return lambda: mock.patch.object(networks, "band_rows", lambda width, batch=1: rows)


def inside(
    context: Callable[[], contextlib.AbstractContextManager[object]], model: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """``model`` called inside ``context()`` (a compiled ``model`` is traced inside it too)."""

    def run(x: Tensor) -> Tensor:
        with context():
            return model(x)

    return run


def bf16_autocast(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``model`` under CPU bf16 autocast (oneDNN's bf16 kernels where the CPU has AVX512-BF16 or
    AMX); an opt-in lower precision whose error the table states."""

    def run(x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    return run


def channels_last(model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """``model`` with its weights and input in channels-last layout (NHWC): the LayerNorm over
    channels then reads contiguous rows without its two permutes, and oneDNN picks NHWC kernels."""
    model = model.to(memory_format=torch.channels_last)

    def run(x: Tensor) -> Tensor:
        return model(x.contiguous(memory_format=torch.channels_last))

    return run


def onnx_profile(path: Path, x: Tensor, threads: int, calls: int = 3) -> None:
    """onnxruntime's profiler: the share of its kernel time per operator type."""
    import collections
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    print(f"onnxruntime kernel time per operator ({path.name}, {calls} calls, profiler on):")
    for op, micros in per_op.most_common(10):
        print(f"  {op:24s} {micros / calls / 1e3:7.1f} ms  {100 * micros / total:4.1f}%")


def fuse_folder_seconds(pairs: int, backend: list[str]) -> float:
    """Seconds per pair of ``run.py fuse`` over a folder of ``pairs`` copies of ``MSRS_PAIR``
    (made in a temporary folder), with the backend options ``backend``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))
    from tdfusion.cli import build_parser

    work = Path(tempfile.mkdtemp(prefix="fusion_speed-"))
    for side, source in zip("ab", MSRS_PAIR, strict=True):
        (work / side).mkdir()
        for i in range(pairs):
            shutil.copyfile(source, work / side / f"{i:04d}.png")
    args = build_parser().parse_args(
        ["fuse", *backend, "--a", str(work / "a"), "--b", str(work / "b"), "--out", str(work / "out"), "--quiet"]
    )
    started = time.perf_counter()
    args.func(args)
    return (time.perf_counter() - started) / pairs


def reference_in_child(args: argparse.Namespace) -> tuple[float, Tensor]:
    """The eager reference's median seconds and output, timed in a child process that keeps
    glibc's default ``malloc``."""
    result = Path(tempfile.mkdtemp(prefix="fusion_speed-")) / "reference.pt"
    command = [sys.executable, __file__, "--reference-only", str(result), "--malloc", "default"]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--size", *map(str, args.size)]
    subprocess.run(command, check=True)
    saved = torch.load(result, weights_only=True)
    return float(saved["seconds"]), saved["output"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--onnx-profile", action="store_true", help="print onnxruntime's time per operator type")
    p.add_argument("--folder", type=int, default=0, metavar="N", help="also time `fuse` on a folder of N pairs")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="TEXT",
        help="time only the variants whose name holds one of these texts (the reference always runs)",
    )
    add_malloc_option(p, note="this process only: the reference's child always keeps the default")
    p.add_argument(
        "--band-rows",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also time eager channels-last in bands of N rows (the default: about 20,480 pixels a band)",
    )
    p.add_argument("--reference-only", metavar="FILE", help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    x = torch.rand(1, 2, *args.size, generator=torch.Generator().manual_seed(0))
    if args.reference_only:
        with torch.inference_mode(), textbook_attention():
            seconds, out = median_seconds(functools.partial(network(), x), args.repeats)
        torch.save({"seconds": seconds, "output": out}, args.reference_only)
        return
    print(
        f"{args.size[0]} x {args.size[1]}, {args.threads} threads, torch {torch.__version__}, "
        f"{'released IVIF weights' if WEIGHTS.is_file() else 'random weights'}, this process's malloc: {args.malloc}"
    )
    reference_time, reference = reference_in_child(args)
    print("| variant | seconds | speed-up | max difference |\n|---|---|---|---|")
    print(f"| eager, default malloc (reference) | {reference_time:.3f} | 1.00x | 0 |", flush=True)
    variants: dict[str, Callable[[Tensor], Tensor]] = {
        "eager": network(),
        "eager, float32 attention reductions": network(precise_attention=False),
        "torch.compile": torch.compile(network()),
        "eager, channels-last": channels_last(network()),
        "eager, channels-last, whole image": inside(whole_images, channels_last(network())),
        "eager, channels-last, whole image, textbook attention": inside(textbook_attention, channels_last(network())),
        "torch.compile, channels-last": torch.compile(channels_last(network())),
        "torch.compile, channels-last, textbook attention": inside(
            textbook_attention, torch.compile(channels_last(network()))
        ),
        "torch.compile, channels-last, float32 attention reductions": torch.compile(
            channels_last(network(precise_attention=False))
        ),
        "torch.compile max-autotune, channels-last": torch.compile(channels_last(network()), mode="max-autotune"),
        "eager, bf16 autocast (opt-in)": bf16_autocast(network()),
        "eager, channels-last, bf16 autocast (opt-in)": bf16_autocast(channels_last(network())),
        "eager, channels-last, whole image, bf16 autocast (opt-in)": inside(
            whole_images, bf16_autocast(channels_last(network()))
        ),
        "torch.compile, bf16 autocast (opt-in)": bf16_autocast(torch.compile(network())),
    }

    for rows in args.band_rows:
        variants[f"eager, channels-last, bands of {rows} rows"] = inside(in_bands_of(rows), channels_last(network()))

    def wanted(name: str) -> bool:
        return not args.only or any(text in name for text in args.only)

    variants = {name: fn for name, fn in variants.items() if wanted(name)}
    onnx_names = ("onnxruntime (exported)", "onnxruntime, float32 attention reductions")
    if any(wanted(name) for name in onnx_names):  # else left out by --only: no export
        try:  # the deploy extra
            from metaloss.fusion.export import OnnxFusion, export_onnx

            onnx_file = export_onnx(network(), Path(tempfile.mkdtemp()) / "refusion.onnx")
            fast_file = export_onnx(network(precise_attention=False), Path(tempfile.mkdtemp()) / "refusion32.onnx")
            for name, path in zip(onnx_names, (onnx_file, fast_file)):
                if wanted(name):
                    variants[name] = OnnxFusion(path, threads=args.threads)
            if args.onnx_profile:
                onnx_profile(fast_file, x, args.threads)
        except ImportError:
            print("(onnxruntime not installed: pip install -e '.[deploy]')")
    network_seconds: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            seconds, out = median_seconds(functools.partial(fn, x), args.repeats)
            network_seconds[name] = seconds
            diff = float((out - reference).abs().max())
            print(f"| {name} | {seconds:.3f} | {reference_time / seconds:.2f}x | {diff:.1e} |", flush=True)
    if args.folder and all(f.is_file() for f in (WEIGHTS, *MSRS_PAIR)):
        print(f"\n`fuse` on a folder of {args.folder} MSRS pairs, per pair\n")
        print("| backend | fuse, s per pair | network alone, s | fuse / network |\n|---|---|---|---|")
        # `fuse` runs the torch backend in channels-last layout.
        backends = {"eager, channels-last": ["--weights", str(WEIGHTS), "--device", "cpu"]}
        if "onnxruntime (exported)" in variants:
            backends["onnxruntime (exported)"] = ["--weights", str(onnx_file), "--backend", "onnxruntime"]
        backends["eager, channels-last, bf16 autocast (opt-in)"] = [*backends["eager, channels-last"], "--bf16"]
        for name, options in backends.items():
            per_pair = fuse_folder_seconds(args.folder, options)
            alone = network_seconds.get(name, float("nan"))  # nan: left out by --only
            print(f"| {name} | {per_pair:.3f} | {alone:.3f} | {per_pair / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
