"""Time a meta iteration against a plain iteration, side by side in one run.

A plain iteration is one ordinary step of F (learnable loss, weights detached) and T; a meta
iteration is one MetaStep (virtual steps of F and T, outer gradient to G). Both use ReFusion,
TDFusion's loss generator and the chosen task network, on random batches of the given sizes.
Prints median seconds per iteration and the ratio; peak RSS at the end (CPU) or peak CUDA memory.

    python benchmarks/meta_iteration.py --task-net segformer --crop 128 --task-size 128 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))

import torch  # noqa: E402
from malloc_option import add_malloc_option, apply_malloc_option  # noqa: E402
from memory_trace import StageTrace, mmap_threshold_note, saved_gib_by_dtype  # noqa: E402
from peak_memory import peak_rss_gib  # noqa: E402
from tdfusion.tasks import build_task, detection_targets  # noqa: E402
from timing import median_seconds  # noqa: E402

from metaloss import InnerSGD, MetaStep, MetaTrainer, MetaTrainerConfig, SourcesAdapter  # noqa: E402
from metaloss.fusion import LossGenerator, ReFusion, tdfusion_loss  # noqa: E402
from metaloss.meta_step import META_STEP_STAGES, SECOND_ORDERS, VIRTUAL_STEPS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-net", default="segformer", choices=("segformer", "unet", "yolov8"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--task-size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--mode", default="exact", choices=("exact", "finite_difference"))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round (their median counts)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of plain and meta (the fastest counts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the meta step")
    p.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="F and G recompute each Restormer block in the backward passes (ReFusion(checkpoint_blocks=True)), "
        "in both iterations",
    )
    p.add_argument(
        "--virtual-step",
        default="model",
        choices=VIRTUAL_STEPS,
        help="the meta step's virtual step: model (the paper's) or output (the TDFusion demo's default)",
    )
    p.add_argument(
        "--second-order",
        default="jvp",
        choices=SECOND_ORDERS,
        help="how the exact mode differentiates F's virtual step: jvp (the default) or double_backward",
    )
    p.add_argument(
        "--compile-generator",
        action="store_true",
        help="compile the loss generator in place (nn.Module.compile) for both iterations, as a user may",
    )
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest ops of one meta step")
    p.add_argument(
        "--stages",
        type=int,
        default=0,
        metavar="N",
        help="profile N more meta steps and print the time of each named stage a step (META_STEP_STAGES)",
    )
    p.add_argument(
        "--trace-memory",
        action="store_true",
        help="instead of timing: saved tensors of F and G by dtype, and memory by stage of one meta step "
        "(run with MALLOC_MMAP_THRESHOLD_=65536 and --malloc default; benchmarks/memory_trace.py)",
    )
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    task = build_task(args.task_net, 3)
    blocks = args.checkpoint_blocks
    model = ReFusion(checkpoint_blocks=blocks).to(device)
    loss = tdfusion_loss(LossGenerator(checkpoint_blocks=blocks)).to(device)
    if args.compile_generator:
        loss.generator.compile()
    task.model.to(device)
    b, (h, w), c = args.batch_size, args.task_size, args.crop
    batch: dict[str, Any] = {
        "a": torch.rand(b, 1, c, c),
        "b": torch.rand(b, 1, c, c),
        "task_a": torch.rand(b, 1, h, w),
        "task_b": torch.rand(b, 1, h, w),
        "mask": torch.randint(0, 3, (b, h, w)),
        "det": detection_targets([torch.tensor([[0.5, 0.5, 0.2, 0.3]])] * b, [torch.tensor([1])] * b),
    }
    batch = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else {kk: vv.to(device) for kk, vv in v.items()})
        for k, v in batch.items()
    }
    adapter = SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b"))
    dtype = torch.bfloat16 if args.bf16 else None
    meta = MetaStep(
        model,
        loss,
        task.model,
        task.loss,
        adapter=adapter,
        inner=InnerSGD(1e-4),
        task_inner=InnerSGD(1e-4),
        outer_optimizer=torch.optim.Adam(loss.parameters(), 1e-4),
        mode=args.mode,
        autocast_dtype=dtype,
        activation_checkpointing=args.checkpointing,
        virtual_step=args.virtual_step,
        second_order=args.second_order,
    )
    trainer = MetaTrainer(
        model,
        loss,
        task.model,
        task.loss,
        [batch, batch],
        adapter=adapter,
        config=MetaTrainerConfig(progress=False, autocast_dtype="bfloat16" if args.bf16 else None),
    )

    if args.trace_memory:
        trace_memory(meta, model, loss, task.model, batch)
        return
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def timed(fn) -> float:
        return median_seconds(fn, args.repeats, sync)[0]

    plain, metas = [], []
    for _ in range(args.rounds):  # interleaved, so that machine noise hits both alike
        plain.append(timed(lambda: trainer.model_step(batch)))
        metas.append(timed(lambda: meta.step(batch, batch)))
    t_plain, t_meta = min(plain), min(metas)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "  # noqa: E501
        f"task {args.task_net}, batch {b}, crop {c}, task view {h}x{w}, mode {args.mode}, bf16 {args.bf16}, "
        f"activation checkpointing {args.checkpointing}, blocks checkpointed {blocks}, "
        f"virtual step {args.virtual_step}, "
        f"second order {args.second_order}, generator compiled {args.compile_generator}"
    )
    print(f"plain iteration  {t_plain:.3f} s")
    print(f"meta iteration   {t_meta:.3f} s  ({t_meta / t_plain:.2f}x plain)")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak RSS         {peak_rss_gib():.2f} GiB")
    if args.stages:
        print_stages(meta, batch, args.stages, t_meta, device)
    if args.profile:
        prof, _ = profiled_steps(meta, batch, 1, device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60))


def profiled_steps(
    meta: MetaStep, batch: Any, steps: int, device: torch.device
) -> tuple[torch.profiler.profile, float]:
    """``steps`` meta steps under ``torch.profiler`` (CPU, and CUDA on a GPU); the profile and the
    seconds a profiled step took."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            meta.step(batch, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
    return prof, seconds


def print_stages(meta: MetaStep, batch: Any, steps: int, t_meta: float, device: torch.device) -> None:
    """The time of each named stage of a meta step (``torch.profiler`` ranges), averaged over
    ``steps`` profiled steps, and its share of a profiled step (``t_meta``: the unprofiled one)."""
    prof, profiled = profiled_steps(meta, batch, steps, device)
    seconds = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key in META_STEP_STAGES}
    print(
        f"\nprofiled meta step {profiled:.3f} s ({profiled / t_meta:.2f}x the timed one: the profiler's overhead)\n"
        "| stage | seconds a profiled step | share of it | what it holds |\n|---|---|---|---|"
    )
    for name, what in META_STEP_STAGES.items():
        if name in seconds:
            print(f"| {name} | {seconds[name]:.3f} | {seconds[name] / profiled:.0%} | {what} |")
    print("(forward_product is inside second_order; on a GPU the times are the host's, launch to return)")


def trace_memory(meta: MetaStep, model: torch.nn.Module, loss: Any, task_model: torch.nn.Module, batch: Any) -> None:
    """Print what F's and G's graphs save, by dtype, and one meta step's memory by stage."""
    x, sources = torch.cat([batch["a"], batch["b"]], dim=1), [batch["a"], batch["b"]]
    for name, forward in (("F", lambda: model(x)), ("G", lambda: loss.weights(sources))):
        sizes = saved_gib_by_dtype(forward)
        print(f"{name} saves {sum(sizes.values()):.2f} GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))
    meta.step(batch, batch)  # warm-up
    trace = StageTrace()
    with trace.around(model, task_model, loss):
        meta.step(batch, batch)
    print(trace.table())
    print(f"peak RSS of the process {peak_rss_gib():.2f} GiB {mmap_threshold_note()}")


if __name__ == "__main__":
    main()
