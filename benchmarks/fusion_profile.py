"""Where fusion inference's time goes, and how far the convolutions alone are from 10x.

ReFusion on one 480 x 640 pair (the released infrared-visible weights, or random weights when
the shared data is absent), eager, channels-last, in row bands: the fastest exact path that
``fuse`` takes (``benchmarks/fusion_speed.py``). Each convolution is timed where the network
calls it (forward hooks read a clock before and after each call) and its
multiply-adds counted, halo rows included, by kind: 1 x 1 (matrix products over the channels),
depth-wise 3 x 3, and full 3 x 3. The time of everything else (LayerNorm, GELU, the gates'
products, the residual sums, the attention's sums and mixing, copies) is the rest of the call,
split by ``torch.profiler`` per operator (shapes not recorded: recording them distorts the times).

For scale, the script times a large float32 matrix product (2048 x 2048 x 2048) on the same
threads, and the eager reference of ``fusion_speed.py`` (default ``malloc``, whole image, textbook
attention) in a child process. It prints what 10x would leave for everything but the
convolutions if they kept their rates. ``--bf16`` profiles ``fuse --bf16`` instead (bf16 autocast).

    python benchmarks/fusion_profile.py --threads 2
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from fusion_speed import bf16_autocast, channels_last, network, reference_in_child
from malloc_option import add_malloc_option, apply_malloc_option
from timing import median_seconds
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d")


def kind_of(conv: nn.Conv2d) -> str:
    """The convolution's kind: "1 x 1", "depth-wise k x k" or "full k x k"."""
    size = f"{conv.kernel_size[0]} x {conv.kernel_size[1]}"
    if conv.kernel_size == (1, 1):
        return size
    if conv.groups == conv.in_channels == conv.out_channels:
        return f"depth-wise {size}"
    return f"full {size}"


class ConvolutionClock:
    """Seconds and multiply-adds of a network's ``nn.Conv2d`` calls, per kind, while active."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.macs: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self._started = 0.0

    def _before(self, conv: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._started = time.perf_counter()

    def _after(self, conv: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        elapsed = time.perf_counter() - self._started
        assert isinstance(conv, nn.Conv2d)
        kind = kind_of(conv)
        kh, kw = conv.kernel_size
        self.seconds[kind] += elapsed
        self.calls[kind] += 1
        self.macs[kind] += out.numel() * (conv.in_channels // conv.groups) * kh * kw

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = [c.register_forward_pre_hook(self._before) for c in self._convs]
        handles += [c.register_forward_hook(self._after) for c in self._convs]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n x n`` float32 matrix product on this process's threads (median)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    seconds, _ = median_seconds(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls (after one warm-up)")
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--bf16", action="store_true", help="profile the network under bf16 autocast (fuse --bf16)")
    add_malloc_option(p, note="this process only: the reference's child always keeps the default")
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    x = torch.rand(1, 2, *args.size, generator=torch.Generator().manual_seed(0))
    reference_time, _ = reference_in_child(args)
    model = network()
    fuse = bf16_autocast(channels_last(model)) if args.bf16 else channels_last(model)
    clock = ConvolutionClock(model)
    with torch.inference_mode():
        fuse(x)  # warm-up
        totals = []
        with clock.active():
            for _ in range(args.repeats):
                started = time.perf_counter()
                fuse(x)
                totals.append(time.perf_counter() - started)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                fuse(x)
    rate = matmul_rate()
    n = args.repeats
    total = sum(totals) / n
    variant = "eager channels-last in bands" + (", bf16 autocast" if args.bf16 else "")
    print(
        f"{args.size[0]} x {args.size[1]}, {args.threads} threads, torch {torch.__version__}; {variant}: {total:.3f} s "
        f"a call (mean of {n}, the clocks on); reference {reference_time:.3f} s; a 2048^3 float32 matrix product: "
        f"{rate:.0f} GFLOP/s\n"
    )
    print("| layer | calls | ms a call | share | GFLOP a call | GFLOP/s | of the matrix product's rate |")
    print("|---|---|---|---|---|---|---|")
    conv_seconds = 0.0
    for kind in sorted(clock.seconds, key=clock.seconds.__getitem__, reverse=True):
        seconds, gflop = clock.seconds[kind] / n, 2 * clock.macs[kind] / n / 1e9
        conv_seconds += seconds
        print(
            f"| {kind} convolutions | {clock.calls[kind] // n} | {1e3 * seconds:.1f} | {seconds / total:.0%} | "
            f"{gflop:.2f} | {gflop / seconds:.0f} | {gflop / seconds / rate:.0%} |"
        )
    rest = total - conv_seconds
    print(f"| everything else | | {1e3 * rest:.1f} | {rest / total:.0%} | | | |\n")
    others = [e for e in prof.key_averages() if e.key not in CONVOLUTION_OPS and e.self_cpu_time_total > 0]
    others.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("everything else, by operator (torch.profiler, self time, ms a call):")
    for event in others[:10]:
        print(f"  {event.key:28s} {event.self_cpu_time_total / n / 1e3:7.1f}")
    target = reference_time / 10
    print(
        f"\n10x the reference is {target:.3f} s. The convolutions alone take {conv_seconds:.3f} s "
        f"({reference_time / conv_seconds:.1f}x the reference), which leaves "
        f"{1e3 * (target - conv_seconds):.0f} ms for everything else, now {1e3 * rest:.0f} ms."
    )


if __name__ == "__main__":
    main()
