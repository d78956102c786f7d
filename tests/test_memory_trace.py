"""The benchmark's memory tracer (benchmarks/memory_trace.py): what it counts and what it frees."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_trace import StageTrace, saved_gib_by_dtype  # noqa: E402


def test_saved_tensors_are_counted_by_dtype_and_the_graph_is_freed() -> None:
    """``exp`` saves its output; the count is its size in its dtype, and counting does not keep
    the graph alive (a hook that hands back the saved output itself would)."""
    x = torch.rand(1024, 256, dtype=torch.float64, requires_grad=True)
    outputs: list[weakref.ref[torch.Tensor]] = []

    def forward() -> torch.Tensor:
        y = x.exp()
        outputs.append(weakref.ref(y))
        return y.float().sum()

    sizes = saved_gib_by_dtype(forward)
    assert sizes["float64"] * 2**30 == x.numel() * 8
    assert outputs[0]() is None


def test_stage_trace_records_each_wrapped_call_and_restores_the_functions() -> None:
    model, task = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    class Generator:
        def weights(self, x: torch.Tensor) -> torch.Tensor:
            return x.softmax(-1)

    generator, grad = Generator(), torch.autograd.grad
    trace = StageTrace()
    with trace.around(model, task, generator):
        out = task(model(generator.weights(torch.rand(3, 4))))
        torch.autograd.grad(out.sum(), list(model.parameters()))
    assert [row[0] for row in trace.rows] == ["G forward", "F forward", "T forward", "backward (autograd.grad)"]
    assert all(peak >= 0 and seconds >= 0 for _, _, peak, seconds in trace.rows)
    assert torch.autograd.grad is grad and "forward" not in vars(model) and "weights" not in vars(generator)
    assert trace.table().count("\n") == len(trace.rows) + 1
