"""TDFusion's learned loss against a fixed loss, over several seeds: w = 1/2 (ablation I, the
paper's baseline and the default) or infrared only (``--baseline fixed_infrared``).

Each seed runs the demo's two arms (``run.py demo``: procedural scenes with single-camera
look-alikes, Algorithm 1, then a fresh task network trained on each arm's fused training scenes
and scored on its fused test scenes) and prints a table row per seed: downstream mIoU of both
arms, their difference, and where the learned loss puts its weight (w_infrared on hot targets,
w_visible on markings, the brighter source on markings: what a fresh task network rewards there,
see ``benchmarks/oracle_weights.py``; w_visible on the road beside the markings; w_infrared on the
background by day and at night, where the look-alikes are hidden or shown; w_visible by day on
the markings and on the cold look-alikes, which look alike there, bright in visible light only).
Then the mean over seeds, the paired difference's 95% interval, and how many seeds meet the
weight bar (0.7 each).

Options after ``--`` go to the demo (``run.py demo --help``), so every setting can be compared:

    python benchmarks/learned_vs_fixed.py --seeds 5
    python benchmarks/learned_vs_fixed.py --seeds 5 -- --virtual-step model   # the paper's meta-gradient
    python benchmarks/learned_vs_fixed.py --seeds 5 -- --alpha 1 --warmup-epochs 0 --meta-accumulation 1
    python benchmarks/learned_vs_fixed.py --seeds 5 --baseline fixed_infrared   # the fixed loss these scenes favour
    python benchmarks/learned_vs_fixed.py --seeds 5 --arm fixed --fixed-weights 0.75 0.25   # any fixed weights
    python benchmarks/learned_vs_fixed.py --seeds 5 -- --task-repeats 3   # each arm scored by 3 fresh task networks

Runs saved with ``--out`` pair up later, seed by seed, without running anything: ``--compare A B``
prints run A's arm minus run B's over their common seeds (``DIR:ARM`` picks an arm; by default the
learned one, or a one-arm run's only arm; ``DIR1,DIR2`` joins the seeds of several runs):

    python benchmarks/learned_vs_fixed.py --compare runs/epochs10 runs/default
    python benchmarks/learned_vs_fixed.py --compare runs/epochs10 runs/default:fixed_infrared
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tdfusion"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tdfusion.cli import build_parser  # noqa: E402
from tdfusion.commands.demo import ARMS, run_arms  # noqa: E402
from tdfusion.study import paired_interval  # noqa: E402

from metaloss.allocator import retain_freed_memory  # noqa: E402
from metaloss.checkpoint import atomic_path  # noqa: E402
from metaloss.learnable_loss import check_source_weights  # noqa: E402


def _weight_cells(weights: dict[str, float]) -> str:
    """The table's cells of where the learned loss puts its weight ("-" for an arm without maps)."""
    if not weights:
        return " | ".join(["-"] * 6)
    nan = float("nan")
    names = ("target_infrared", "marking_visible", "marking_brighter", "marking_surround_visible")
    cells = [f"{weights.get(name, nan):.2f}" for name in names]
    day, night = (weights.get(f"background_infrared_{when}", nan) for when in ("day", "night"))
    cells.append(f"{day:.2f} / {night:.2f}")
    marking, lookalike = (weights.get(name, nan) for name in ("marking_visible_day", "cold_lookalike_visible_day"))
    cells.append(f"{marking:.2f} / {lookalike:.2f}")
    return " | ".join(cells)


def _save(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` to ``path`` whole or not at all (rewritten after every seed, so an
    interrupted run keeps the seeds it finished)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=float))


def _paired_difference(diff: list[float]) -> str:
    """``paired difference M (95% interval L to H)`` of per-seed differences, as both tables end."""
    mean, low, high = paired_interval(diff)
    interval = f"95% interval {low:+.1f} to {high:+.1f}" if len(diff) > 1 else "no interval from one seed"
    return f"paired difference {mean:+.1f} ({interval})"


def _saved_arm(spec: str) -> tuple[str, dict[int, float]]:
    """``DIR[,DIR...][:ARM]`` (each ``DIR`` a ``--out`` folder or its ``results.json``; several
    folders join their seeds): a label and the arm's downstream mIoU by seed. Raises
    ``ValueError`` naming the file, the arm or the seed that is wrong."""
    folders, _, arm = spec.rpartition(":") if ":" in spec else (spec, "", "")
    rows: list[tuple[Path, dict[str, Any]]] = []
    for folder in folders.split(","):
        path = Path(folder)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{spec}: no results.json at {path} (a folder this script wrote with --out)")
        try:
            rows += [(path, row) for row in json.loads(path.read_text())["rows"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{spec}: {path} is not a results.json of this script ({error!r})") from error
    arms = sorted({name for _, row in rows for name in row["results"]})
    if not arm:
        arm = "tdfusion" if "tdfusion" in arms or len(arms) != 1 else arms[0]
    if arm not in arms:
        raise ValueError(f"{spec}: no run there holds an arm {arm!r}; they hold {arms}")
    scores: dict[int, float] = {}
    for path, row in rows:
        if arm in row["results"]:
            if int(row["seed"]) in scores:
                raise ValueError(f"{spec}: seed {row['seed']} is there twice (again in {path})")
            scores[int(row["seed"])] = float(row["results"][arm]["downstream"]["mIoU"])
    return f"{folders}:{arm}", scores


def compare(first: str, second: str) -> None:
    """Print ``first``'s arm minus ``second``'s, seed by seed over their common seeds, then the
    mean difference with its 95% interval and how many seeds are above 0."""
    (label_a, a), (label_b, b) = _saved_arm(first), _saved_arm(second)
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError(f"{first} and {second} share no seed (seeds {sorted(a)} and {sorted(b)})")
    print(f"A = {label_a}, B = {label_b}\n\n| seed | A mIoU | B mIoU | A - B |\n|---|---|---|---|")
    for seed in seeds:
        print(f"| {seed} | {a[seed]:.1f} | {b[seed]:.1f} | {a[seed] - b[seed]:+.1f} |")
    diff = [a[seed] - b[seed] for seed in seeds]
    mean_a, mean_b = np.mean([a[seed] for seed in seeds]), np.mean([b[seed] for seed in seeds])
    print(
        f"\nover {len(seeds)} common seeds: A {mean_a:.1f}, B {mean_b:.1f} mIoU; {_paired_difference(diff)}; "
        f"{sum(d > 0 for d in diff)} of {len(seeds)} seeds above 0"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (scenes, networks, sample orders)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="log the meta-gradient's cosine to the oracle per epoch")
    p.add_argument("--out", default=None, help="keep each seed's runs and a results.json here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=2)
    fixed_arms = [name for name in ARMS if name != "tdfusion"]
    p.add_argument(
        "--baseline",
        choices=fixed_arms,
        help="the fixed loss to compare with: w = 1/2 (the paper's ablation I, the default) or infrared only",
    )
    p.add_argument(
        "--fixed-weights",
        type=float,
        nargs=2,
        metavar=("W_INFRARED", "W_VISIBLE"),
        help="the fixed loss to compare with, as the weights of the two sources at every pixel (summing to 1; "
        "in place of --baseline; the arm is named fixed_W_INFRARED_W_VISIBLE)",
    )
    p.add_argument(
        "--arm",
        choices=("both", *ARMS, "fixed"),
        default="both",
        help="run one arm only (several option sets can then share one fixed-arm run per seed; no difference "
        "printed); fixed: the baseline alone",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="run nothing: pair two saved runs (--out folders; DIR:ARM picks an arm, DIR1,DIR2 joins runs' seeds) "
        "by seed and print A - B",
    )
    p.add_argument("demo_options", nargs=argparse.REMAINDER, help="after --: options of run.py demo")
    args = p.parse_args()
    if args.compare:
        try:
            compare(*args.compare)
        except ValueError as error:
            p.error(f"--compare: {error}")
        return
    specs = dict(ARMS)
    if args.fixed_weights is None:
        args.baseline = args.baseline or "fixed_half"
    else:
        if args.baseline is not None or args.arm in fixed_arms:
            p.error("--fixed-weights names the fixed arm: give --arm fixed or both, and no --baseline")
        try:
            check_source_weights(args.fixed_weights, 2)
        except ValueError as error:
            p.error(f"--fixed-weights: {error}")
        args.baseline = "fixed_{:g}_{:g}".format(*args.fixed_weights)
        specs[args.baseline] = ("I", tuple(args.fixed_weights))
    retain_freed_memory()  # as run.py does, so that each seed's run is run.py's
    torch.set_num_threads(args.threads)
    extra = [a for a in args.demo_options if a != "--"]
    out = Path(args.out or tempfile.mkdtemp(prefix="learned_vs_fixed-"))
    arm = args.baseline if args.arm == "fixed" else args.arm
    fixed_arm = arm if arm not in ("both", "tdfusion") else args.baseline
    print(f"demo options: {' '.join(extra) or '(defaults)'}; fixed arm: {fixed_arm}; runs in {out}")
    print(
        "\n| seed | TDFusion mIoU | fixed mIoU | difference | w_ir on targets | w_vis on markings "
        "| brighter on markings | w_vis beside markings | w_ir on background, day / night "
        "| w_vis by day on markings / cold look-alikes | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    summary = {"demo_options": extra, "baseline": args.baseline, "rows": rows}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        demo_args = build_parser().parse_args(["demo", *extra, "--seed", str(seed), "--quiet"])
        started = time.time()
        names = ("tdfusion", args.baseline) if arm == "both" else (arm,)
        results = run_arms(demo_args, out / f"seed{seed}", probe=args.probe, arms={n: specs[n] for n in names})
        if arm != "both":
            alone = results[arm]
            miou = f"{alone['downstream']['mIoU']:.1f}"
            cells = (miou, "-") if arm == "tdfusion" else ("-", miou)
            print(
                f"| {seed} | {cells[0]} | {cells[1]} | - | {_weight_cells(alone.get('weights_at', {}))} | "
                f"{time.time() - started:.0f} |",
                flush=True,
            )
            rows.append({"seed": seed, "results": results})
            _save(out / "results.json", summary)
            continue
        ours, base = results["tdfusion"], results[args.baseline]
        row = {
            "seed": seed,
            "tdfusion": ours["downstream"]["mIoU"],
            args.baseline: base["downstream"]["mIoU"],
            "target_infrared": ours["weights_at"]["target_infrared"],
            "marking_visible": ours["weights_at"]["marking_visible"],
            "marking_brighter": ours["weights_at"]["marking_brighter"],
            "marking_surround_visible": ours["weights_at"]["marking_surround_visible"],
            "seconds": time.time() - started,
            "results": results,
        }
        rows.append(row)
        _save(out / "results.json", summary)
        ours_miou, base_miou = row["tdfusion"], row[args.baseline]
        print(
            f"| {seed} | {ours_miou:.1f} | {base_miou:.1f} | {ours_miou - base_miou:+.1f} "
            f"| {_weight_cells(ours['weights_at'])} | {row['seconds']:.0f} |",
            flush=True,
        )
        for probe_row in ours.get("probe", []):
            print("    probe " + ", ".join(f"{k} {v:.3f}" for k, v in probe_row.items()), flush=True)
    if arm != "both":
        return
    diff = [r["tdfusion"] - r[args.baseline] for r in rows]
    maps_ok = sum(r["target_infrared"] >= 0.7 and r["marking_visible"] >= 0.7 for r in rows)
    print(
        f"\nmean over {len(rows)} seeds: TDFusion {np.mean([r['tdfusion'] for r in rows]):.1f}, "
        f"{args.baseline} {np.mean([r[args.baseline] for r in rows]):.1f} mIoU; {_paired_difference(diff)}; "
        f"w_ir on targets {np.mean([r['target_infrared'] for r in rows]):.2f}, "
        f"w_vis on markings {np.mean([r['marking_visible'] for r in rows]):.2f}; weight bar met on {maps_ok} of "
        f"{len(rows)} seeds; {np.mean([r['seconds'] for r in rows]):.0f} s per seed"
    )


if __name__ == "__main__":
    main()
