"""The meta iteration written with ``higher`` (Grefenstette et al., 2019) beside ``MetaStep``.

Both compute the same thing: ``T'`` from one SGD step of ``T`` on ``F(meta-train)``; ``F'`` from
one differentiable SGD step of ``F`` under the learnable loss; the task loss of
``T'(F'(meta-test))`` differentiated with respect to ``G``. ``higher`` patches ``F`` (ReFusion);
it cannot patch SegFormer, so ``T'`` is functional (``torch.func.functional_call``) in both, as
the issue asks. The script first checks that the two meta-gradients agree, then times them
interleaved in one process (median of ``--repeats``), and measures each one's peak RSS in a
process of its own (a peak is per process).

    python benchmarks/peer_higher.py --crop 128 --task-size 128 128
    python benchmarks/peer_higher.py --crop 256 --task-size 256 256 --repeats 3

``higher`` is a benchmark-only dependency (``pip install higher``).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))

import torch  # noqa: E402
from malloc_option import add_malloc_option, apply_malloc_option  # noqa: E402
from peak_memory import peak_rss_gib  # noqa: E402
from tdfusion.tasks import build_task  # noqa: E402
from timing import median_seconds  # noqa: E402
from torch.func import functional_call  # noqa: E402

from metaloss import InnerSGD, MetaStep, SourcesAdapter  # noqa: E402
from metaloss.fusion import LossGenerator, ReFusion, tdfusion_loss  # noqa: E402

LR = 1e-4


def setup(crop: int, task_size: tuple[int, int], seed: int = 0) -> tuple[Any, ...]:
    """F, the learnable loss, T (SegFormer-b0) and one random batch; the same for both methods."""
    torch.manual_seed(seed)
    task = build_task("segformer", 3)
    model, loss = ReFusion(), tdfusion_loss(LossGenerator())
    g = torch.Generator().manual_seed(seed)
    h, w = task_size
    batch = {
        "a": torch.rand(2, 1, crop, crop, generator=g),
        "b": torch.rand(2, 1, crop, crop, generator=g),
        "task_a": torch.rand(2, 1, h, w, generator=g),
        "task_b": torch.rand(2, 1, h, w, generator=g),
        "mask": torch.randint(0, 3, (2, h, w), generator=g),
    }
    return model, loss, task, batch


def metaloss_gradient(model, loss, task, batch) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)  # SegFormer's dropout and stochastic depth draw alike in both methods
    meta = MetaStep(
        model,
        loss,
        task.model,
        task.loss,
        adapter=SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b")),
        inner=InnerSGD(LR),
        task_inner=InnerSGD(LR),
    )
    return meta.hypergradient(batch, batch)[0].grads


def higher_gradient(model, loss, task, batch) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    import higher

    torch.manual_seed(1)
    sources = [batch["a"], batch["b"]]
    task_view = torch.cat([batch["task_a"], batch["task_b"]], 1)
    # T': one SGD step on the current F's task view (no graph to G), functional.
    t_params = {n: p.detach().requires_grad_() for n, p in task.model.named_parameters()}
    with torch.no_grad():
        fused = model(task_view)
    t_loss = task.loss(functional_call(task.model, t_params, (fused,)), batch)
    t_grads = torch.autograd.grad(t_loss, list(t_params.values()))
    t_new = {n: (p - LR * g).detach() for (n, p), g in zip(t_params.items(), t_grads)}
    # F': higher's differentiable SGD step under the learnable loss.
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
        diffopt.step(loss(sources, fmodel(torch.cat(sources, 1))).total)
        outer = task.loss(functional_call(task.model, t_new, (fmodel(task_view),)), batch)
        return torch.autograd.grad(outer, [p for p in loss.parameters() if p.requires_grad])


METHODS = {"metaloss": metaloss_gradient, "higher": higher_gradient}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--task-size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=sorted(METHODS), help="(internal) one method's peak RSS in this process")
    add_malloc_option(
        p,
        default="default",
        note="both methods alike; with retain, the two methods' allocation patterns in one process grew past "
        "24 GiB at 256^2",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    apply_malloc_option(args)
    model, loss, task, batch = setup(args.crop, tuple(args.task_size))
    if args.only:
        METHODS[args.only](model, loss, task, batch)
        print(peak_rss_gib())
        return
    ours, theirs = (METHODS[m](model, loss, task, batch) for m in ("metaloss", "higher"))
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (ours, theirs)]
    agreement = float((flat[0] - flat[1]).norm() / flat[1].norm())
    h, w = args.task_size
    print(f"batch 2 x {args.crop}^2, task view {h}x{w}, SegFormer-b0, {args.threads} threads")
    print(f"meta-gradients agree: relative difference {agreement:.1e}")
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(2):  # interleaved, so that machine noise hits both alike
        for name, fn in METHODS.items():
            times[name].append(median_seconds(functools.partial(fn, model, loss, task, batch), args.repeats)[0])
    peaks = {}
    for name in METHODS:
        command = [sys.executable, __file__, "--only", name, "--crop", str(args.crop), "--threads", str(args.threads)]
        command += ["--task-size", *map(str, args.task_size), "--malloc", args.malloc]
        peaks[name] = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
    t_ours, t_theirs = min(times["metaloss"]), min(times["higher"])
    print("| method | seconds | peak RSS |\n|---|---|---|")
    for name in METHODS:
        print(f"| {name} | {min(times[name]):.3f} | {peaks[name]:.2f} GiB |")
    print(f"metaloss / higher: time {t_ours / t_theirs:.2f}x, peak memory {peaks['metaloss'] / peaks['higher']:.2f}x")


if __name__ == "__main__":
    main()
