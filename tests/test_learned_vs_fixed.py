"""The seed study (benchmarks/learned_vs_fixed.py), run on tiny demos: its table, its results.json
and its summary line say the same thing, and a wrong option is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learned_vs_fixed.py"
TINY_DEMO = (
    "--",
    *("--epochs", "2", "--warmup-epochs", "1", "--meta-iterations", "1"),
    *("--synthetic-train", "4", "--synthetic-test", "2", "--task-epochs", "1"),
    *("--crop", "32", "--task-size", "32", "32"),
)


def _run(*options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "1", *options], capture_output=True, text=True, env=env
    )


def _rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]


def test_each_seed_is_a_row_and_results_json_pairs_the_two_arms(tmp_path: Path) -> None:
    done = _run("--seeds", "2", "--first-seed", "3", "--out", str(tmp_path), *TINY_DEMO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(done.stdout)
    assert [row[0] for row in rows] == ["3", "4"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["baseline"] == "fixed_half" and "--epochs" in saved["demo_options"]
    for row, record in zip(rows, saved["rows"], strict=True):
        ours, fixed, difference = float(row[1]), float(row[2]), float(row[3])
        assert 0 <= ours <= 100 and 0 <= fixed <= 100
        assert ours == pytest.approx(record["tdfusion"], abs=0.05)
        assert fixed == pytest.approx(record["fixed_half"], abs=0.05)
        assert difference == pytest.approx(record["tdfusion"] - record["fixed_half"], abs=0.05)
        assert 0 <= float(row[4]) <= 1  # w_ir on targets, from the learned maps
        assert record["results"]["tdfusion"]["downstream"]["mIoU"] == record["tdfusion"]
    mean = sum(r["tdfusion"] - r["fixed_half"] for r in saved["rows"]) / 2
    assert f"paired difference {mean:+.1f} (95% interval" in done.stdout

    # --compare pairs saved arms by seed and says what the run itself said
    compared = _run("--compare", f"{tmp_path}:tdfusion", f"{tmp_path}:fixed_half")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert [row[:4] for row in _rows(compared.stdout)] == [row[:4] for row in rows]
    assert f"paired difference {mean:+.1f} (95% interval" in compared.stdout
    missing = _run("--compare", str(tmp_path), f"{tmp_path}:fixed_infrared")
    assert missing.returncode == 2 and "an arm 'fixed_infrared'" in missing.stderr and "fixed_half" in missing.stderr
    twice = _run("--compare", f"{tmp_path},{tmp_path}", str(tmp_path))  # joined runs must not repeat a seed
    assert twice.returncode == 2 and "seed 3 is there twice" in twice.stderr


def test_one_arm_alone_leaves_the_weight_cells_empty_and_keeps_its_seeds(tmp_path: Path) -> None:
    done = _run("--arm", "fixed", "--seeds", "1", "--out", str(tmp_path), *TINY_DEMO)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = _rows(done.stdout)
    assert row[1] == "-" and 0 <= float(row[2]) <= 100 and row[3:9] == ["-"] * 6
    assert "nan" not in done.stdout
    (record,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert list(record["results"]) == ["fixed_half"]


def test_task_repeats_score_each_arm_with_several_fresh_networks(tmp_path: Path) -> None:
    done = _run(
        "--arm", "fixed", "--seeds", "1", "--first-seed", "2", "--out", str(tmp_path), *TINY_DEMO, "--task-repeats", "2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = _rows(done.stdout)
    (record,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    scores = record["results"]["fixed_half"]["downstream"]
    assert [run["seed"] for run in scores["task_networks"]] == [1002, 2002]  # seeded apart from the run's own T
    assert scores["mIoU"] == pytest.approx(sum(run["mIoU"] for run in scores["task_networks"]) / 2)
    assert float(row[2]) == pytest.approx(scores["mIoU"], abs=0.05)  # the table shows the mean


def test_fixed_weights_that_do_not_sum_to_one_are_refused_by_name() -> None:
    done = _run("--fixed-weights", "0.6", "0.6")
    assert done.returncode == 2
    assert "--fixed-weights:" in done.stderr and "0.6" in done.stderr
