"""Issue 11's GPU figures in one command, for a session that is lent a GPU.

    python benchmarks/gpu_report.py                          # on cuda: everything (not yet run on one)
    python benchmarks/gpu_report.py --device cpu --quick     # a small smoke run (the test suite's)

Prints three Markdown tables:

1. **Fusion**: ReFusion with the released infrared-visible weights (random weights where the
   shared data is absent) on batches of 480 x 640 pairs, in pairs per second: float32 and bf16
   autocast, eager and ``torch.compile``, each output's largest difference from float32 eager,
   and the peak GPU memory of the call.
2. **Meta iteration**: ``benchmarks/meta_iteration.py`` for SegFormer-b0 and YOLOv8-n at batch
   2 x 256^2, exact mode, float32 and bf16, the eager and the compiled forward-mode product
   (``--second-order compiled_jvp``), each configuration in a process of its own (so that its
   peak memory is its own): plain and meta seconds, their ratio, the peak memory.
3. **Epoch estimate** from each meta row: ``M`` meta iterations and ``N`` plain ones (MSRS: 1083
   training pairs, ``M = 200``, ``N = 542`` at batch 2), and the paper's 50 epochs, data loading
   not counted.

Every timing is a median after a warm-up call (compilation falls in the warm-up), with the device
synchronised around each call.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from fusion_speed import WEIGHTS, network
from meta_iteration_process import run_meta_iteration
from timing import median_seconds


def _synchronize(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


@contextlib.contextmanager
def _precision(device: torch.device, bf16: bool) -> Iterator[None]:
    with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
        yield


def fusion_rows(
    device: torch.device, size: tuple[int, int], batches: list[int], repeats: int, compile_too: bool
) -> list[dict[str, object]]:
    """Pairs per second of each fusion variant at each batch size, and its output's largest
    difference from float32 eager on the first batch."""
    eager = network().to(device)
    compiled = torch.compile(eager) if compile_too else None  # the same module, its calls compiled
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand(b, 2, *size, generator=generator).to(device) for b in batches}
    sync = _synchronize(device)
    rows: list[dict[str, object]] = []
    with torch.inference_mode():
        reference = eager(inputs[batches[0]]).float()
        for name, model in (("eager", eager), ("torch.compile", compiled)):
            if model is None:
                continue
            for bf16 in (False, True):
                for b in batches:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with _precision(device, bf16):
                        seconds, out = median_seconds(functools.partial(model, inputs[b]), repeats, sync)
                    row: dict[str, object] = {"variant": name, "precision": "bf16" if bf16 else "fp32", "batch": b}
                    row["pairs_per_second"] = b / seconds
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                    if b == batches[0]:
                        row["max_difference"] = float((out.float() - reference).abs().max())
                    rows.append(row)
    return rows


def meta_row(
    task_net: str, device: str, size: int, bf16: bool, second_order: str, repeats: int, threads: int
) -> dict[str, float]:
    """One run of ``meta_iteration.py`` in a process of its own; its plain and meta seconds and peak."""
    options = ["--task-net", task_net, "--device", device, "--crop", str(size), "--task-size", str(size), str(size)]
    options += ["--batch-size", "2", "--repeats", str(repeats), "--rounds", "1", "--second-order", second_order]
    return run_meta_iteration(options + (["--bf16"] if bf16 else []), threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (a smoke run)")
    p.add_argument("--quick", action="store_true", help="small sizes, eager only, SegFormer-b0 only: a smoke run")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="fusion batch sizes (pairs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (and per subprocess)")
    p.add_argument("--meta-iterations", type=int, default=200, help="M: meta iterations per epoch (the paper's)")
    p.add_argument("--plain-iterations", type=int, default=542, help="N: plain iterations per epoch (MSRS at batch 2)")
    p.add_argument("--epochs", type=int, default=50)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --quick for a smoke run)")
    torch.set_num_threads(args.threads)
    size, meta_size = ((48, 64), 64) if args.quick else ((480, 640), 256)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    weights = "the released weights" if WEIGHTS.is_file() else "random weights (no shared data)"
    print(f"{machine}, torch {torch.__version__}; fusion at {size[0]} x {size[1]} with {weights}\n")

    print("| fusion | precision | batch | pairs per second | max difference from fp32 eager | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for row in fusion_rows(device, size, args.batches, args.repeats, compile_too=not args.quick):
        difference = f"{row['max_difference']:.1e}" if "max_difference" in row else ""
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        print(
            f"| {row['variant']} | {row['precision']} | {row['batch']} | {row['pairs_per_second']:.1f} "
            f"| {difference} | {peak} |",
            flush=True,
        )

    configs = [
        (task, bf16, order)
        for task in (("segformer",) if args.quick else ("segformer", "yolov8"))
        for bf16 in ((False,) if args.quick else (False, True))
        for order in (("jvp",) if args.quick else ("jvp", "compiled_jvp"))
    ]
    print(f"\n| meta iteration, 2 x {meta_size}^2 | precision | second order | plain (s) | meta (s) | ratio ", end="")
    print("| peak (GiB) |\n|---|---|---|---|---|---|---|")
    rows = []
    for task, bf16, order in configs:
        r = meta_row(task, args.device, meta_size, bf16, order, max(1, args.repeats // 2), args.threads)
        rows.append((task, bf16, order, r))
        print(
            f"| {task} | {'bf16' if bf16 else 'fp32'} | {order} | {r['plain']:.3f} | {r['meta']:.3f} "
            f"| {r['meta'] / r['plain']:.2f}x | {r['memory']:.2f} |",
            flush=True,
        )

    m, n, epochs = args.meta_iterations, args.plain_iterations, args.epochs
    print(f"\n| epoch estimate (M = {m}, N = {n}) | precision | second order | one epoch (s) | {epochs} epochs (h) |")
    print("|---|---|---|---|---|")
    for task, bf16, order, r in rows:
        epoch = m * r["meta"] + n * r["plain"]
        print(f"| {task} | {'bf16' if bf16 else 'fp32'} | {order} | {epoch:.0f} | {epochs * epoch / 3600:.2f} |")


if __name__ == "__main__":
    main()
