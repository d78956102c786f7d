"""The GPU report (benchmarks/gpu_report.py), run as a small smoke run on the CPU, so that it works
the day a GPU is lent: its three tables are filled from real runs and agree with each other."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_report.py"


def _run(*options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *options], capture_output=True, text=True, env=env)


def _rows(output: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_the_smoke_run_fills_every_table_and_the_estimate_follows_from_the_meta_row() -> None:
    done = _run("--device", "cpu", "--quick", "--threads", "1", "--repeats", "1", "--meta-iterations", "10")
    assert done.returncode == 0, done.stderr[-3000:]
    fusion = _rows(done.stdout, "eager")
    assert [(r[1], r[2]) for r in fusion] == [("fp32", "1"), ("fp32", "8"), ("bf16", "1"), ("bf16", "8")]
    assert all(float(r[3]) > 0 for r in fusion)
    assert float(fusion[0][4]) == 0.0 and 0 < float(fusion[2][4]) < 0.1  # bf16 differs, within bf16 rounding
    meta, estimate = _rows(done.stdout, "segformer")
    plain_s, meta_s, ratio = float(meta[3]), float(meta[4]), float(meta[5].rstrip("x"))
    assert plain_s > 0 and meta_s > 0 and ratio == pytest.approx(meta_s / plain_s, abs=0.01)
    assert float(meta[6]) > 0
    assert re.search(r"M = 10, N = 542", done.stdout)
    assert float(estimate[3]) == pytest.approx(10 * meta_s + 542 * plain_s, abs=1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_one_is_refused_by_name() -> None:
    done = _run("--device", "cuda")
    assert done.returncode == 2
    assert "--device cuda: no CUDA device here" in done.stderr
