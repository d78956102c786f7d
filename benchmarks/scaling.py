"""How fusion time and the meta iteration's time and memory grow with image size and batch size.

Fusion: ReFusion (eager, inference mode) on one pair of each square size, and on batches of pairs
at one size (``--fusion-batches``, seconds per pair), as it runs at inference
(its blocks in bands of rows where ``metaloss.fusion.bands.worth_banding``) and on the whole image
(bands turned off), side by side, in the default layout or (``--channels-last``) as ``fuse`` runs
it. Meta iteration: one run
of ``benchmarks/meta_iteration.py`` per configuration, each in a fresh process so that its peak
memory is its own; with ``--checkpointed-sizes``, also at batch 1 with each block of ``F`` and
``G`` checkpointed, which reaches 1024^2 on a 24-GiB machine. Prints one table per part and
writes a two-panel plot.

    python benchmarks/scaling.py --fusion-sizes 128 256 512 1024 --fusion-batches 1 2 4 \\
        --meta-sizes 64 128 192 256 --batches 1 2 4 --channels-last --plot docs/img/scaling_cpu.png
    python benchmarks/scaling.py --fusion-sizes 128 256 512 1024 --fusion-batches --meta-sizes 64 128 192 256 \\
        --batches --checkpointed-sizes 256 512 1024 --channels-last --plot docs/img/scaling_cpu.png
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from malloc_option import add_malloc_option, apply_malloc_option
from meta_iteration_process import run_meta_iteration
from timing import median_seconds

from metaloss.fusion import ReFusion
from metaloss.fusion.bands import whole_images


def fusion_seconds(size: int, repeats: int, bands: bool = True, channels_last: bool = False, batch: int = 1) -> float:
    """Median seconds of ReFusion on a batch of ``batch`` pairs of ``size x size``, as at inference
    (bands where ``bands.worth_banding``) or on the whole image, in the default or the
    channels-last layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = ReFusion().eval().to(memory_format=layout)
    x = torch.rand(batch, 2, size, size).contiguous(memory_format=layout)
    with torch.inference_mode(), contextlib.nullcontext() if bands else whole_images():
        return median_seconds(lambda: model(x), repeats)[0]


def meta_iteration(
    size: int, batch: int, device: str, threads: int, malloc: str, checkpoint_blocks: bool = False
) -> dict[str, float]:
    options = ["--crop", str(size), "--task-size", str(size), str(size), "--batch-size", str(batch)]
    options += ["--checkpoint-blocks"] if checkpoint_blocks else []
    return run_meta_iteration(options + ["--repeats", "2", "--device", device, "--malloc", malloc], threads)


def _meta_table_row(label: str, r: dict[str, float]) -> str:
    """One row of the meta-iteration table: plain and meta seconds, their ratio, the peak."""
    return f"| {label} | {r['plain']:.3f} | {r['meta']:.3f} | {r['meta'] / r['plain']:.1f}x | {r['memory']:.2f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fusion-sizes", type=int, nargs="*", default=[128, 256, 512, 1024])
    p.add_argument("--fusion-batches", type=int, nargs="*", default=[1, 2, 4], help="at --fusion-batch-side")
    p.add_argument("--fusion-batch-side", type=int, default=512)
    p.add_argument("--meta-sizes", type=int, nargs="*", default=[64, 128, 192], help="at batch 2")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4], help="at the second meta size")
    p.add_argument(
        "--checkpointed-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also meta iterations at batch 1 with each block of F and G checkpointed (--checkpoint-blocks), "
        "at these sides (1024: about 15 GiB on a CPU)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="fusion in the channels-last layout (as `fuse` runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", default=None, help="write the plot here (PNG)")
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    layout = "channels-last" if args.channels_last else "default layout"
    print(f"{machine}, torch {torch.__version__}, malloc: {args.malloc}, fusion in the {layout}\n")

    fusion: dict[int, float] = {}
    whole: dict[int, float] = {}
    print(
        "| fusion, one pair | seconds | per megapixel | whole image: seconds | per megapixel |\n|---|---|---|---|---|"
    )
    for s in args.fusion_sizes:
        fusion[s] = fusion_seconds(s, args.repeats, channels_last=args.channels_last)
        whole[s] = fusion_seconds(s, args.repeats, bands=False, channels_last=args.channels_last)
        mp = s * s / 1e6
        print(
            f"| {s} x {s} | {fusion[s]:.3f} | {fusion[s] / mp:.2f} | {whole[s]:.3f} | {whole[s] / mp:.2f} |", flush=True
        )

    side = args.fusion_batch_side
    if args.fusion_batches:
        print(
            f"\n| fusion, batch of {side} x {side} pairs | seconds per pair | whole image: seconds per pair |"
            "\n|---|---|---|"
        )
    for b in args.fusion_batches:
        banded = fusion_seconds(side, args.repeats, channels_last=args.channels_last, batch=b) / b
        full = fusion_seconds(side, args.repeats, bands=False, channels_last=args.channels_last, batch=b) / b
        print(f"| {b} | {banded:.3f} | {full:.3f} |", flush=True)

    rows: list[tuple[int, int, dict[str, float]]] = []
    configs = [(s, 2) for s in args.meta_sizes]
    if args.meta_sizes:
        middle = args.meta_sizes[min(1, len(args.meta_sizes) - 1)]
        configs += [(middle, b) for b in args.batches if (middle, b) not in configs]
    print("\n| meta iteration | plain (s) | meta (s) | ratio | peak memory (GiB) |\n|---|---|---|---|---|")
    for size, batch in configs:
        r = meta_iteration(size, batch, args.device, args.threads, args.malloc)
        rows.append((size, batch, r))
        print(_meta_table_row(f"batch {batch} x {size}^2", r), flush=True)

    checkpointed: list[tuple[int, dict[str, float]]] = []
    for size in args.checkpointed_sizes:
        r = meta_iteration(size, 1, args.device, args.threads, args.malloc, checkpoint_blocks=True)
        checkpointed.append((size, r))
        print(_meta_table_row(f"batch 1 x {size}^2, blocks checkpointed", r), flush=True)

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot([s * s / 1e6 for s in fusion], list(fusion.values()), "o-", label="in bands of rows")
        left.plot([s * s / 1e6 for s in whole], list(whole.values()), "s--", label="whole image")
        left.legend(fontsize=8)
        left.set(xlabel="megapixels", ylabel="seconds", title=f"fusion, one pair ({machine})")
        at2 = [(s, r) for s, b, r in rows if b == 2]
        right.plot([s for s, _ in at2], [r["meta"] for _, r in at2], "o-", label="meta iteration (s)")
        right.plot([s for s, _ in at2], [r["plain"] for _, r in at2], "o-", label="plain iteration (s)")
        right.plot([s for s, _ in at2], [r["memory"] for _, r in at2], "s--", label="meta peak memory (GiB)")
        if checkpointed:
            sides = [s for s, _ in checkpointed]
            label = "meta (s), batch 1, blocks checkpointed"
            right.plot(sides, [r["meta"] for _, r in checkpointed], "^:", label=label)
            right.plot(sides, [r["memory"] for _, r in checkpointed], "v:", label="its peak memory (GiB)")
            right.set_yscale("log")
        batches = "batch 2" + (", and batch 1 where said" if checkpointed else "")
        right.set(xlabel=f"crop and task-view side ({batches})", title="meta iteration, SegFormer-b0")
        right.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=80)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
