"""Tutorial 5: reproducing the paper on a GPU (MSRS, FMB, M3FD, LLVIP).

For one data set this runs the whole protocol of the paper with the example's commands, prints
each command as you would type it, and writes ``report.md`` with our numbers beside the paper's:

1. ``check-data``: the folder as downloaded, with the labels its task network needs;
2. ``train`` with ``configs/<data set>.yaml`` (the paper's settings: 50 epochs of 200 meta
   iterations, batch 2, Adam 1e-4, alpha 1), once per arm: TDFusion and ablation I (fixed
   ``w = 1/2``; add ``--arms none I II III IV V`` for all of Table 3);
3. ``fuse`` the training and test pairs of the split with each arm's ``fusion.safetensors``;
4. ``evaluate``: the six fusion metrics on the fused test pairs (Table 1);
5. ``downstream``: a fresh SegFormer (MSRS, FMB) or YOLOv8 (M3FD, LLVIP) per arm, trained 300
   epochs on its fused training images and scored on its fused test images (Table 2).

::

    python examples/tutorials/reproduce_paper.py --dataset msrs --root data/MSRS --out runs/msrs
    python examples/tutorials/reproduce_paper.py --dataset fmb --root data/FMB --out runs/fmb --arms none I II III IV V
    python examples/tutorials/reproduce_paper.py --dataset m3fd --root data/M3FD --out runs/m3fd --dry-run

``key=value`` items go to ``train`` (``epochs=10 meta_iterations=50`` for a shorter run). Time
and memory (``docs/tutorials.md``): one NVIDIA H100 ran a meta iteration in 0.40 s and an
ordinary one in 0.084 s (fp32, batch 2 at 256 x 256; SegFormer-b0 and YOLOv8-n alike), peak
10.7 GiB; from these we *estimate* (not measured end to end) a 50-epoch MSRS training at about
105 minutes per arm. Each step is skipped when its output exists, so a stopped run continues.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tdfusion"))  # the example's `tdfusion` package

from tdfusion.catalog import dataset_files  # noqa: E402
from tdfusion.cli import main as run_py  # noqa: E402  (python examples/tdfusion/run.py ...)
from tdfusion.data import PairFiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

PAPER: dict[str, dict[str, Any]] = {
    "msrs": {
        "task": "segformer",
        "table1": {"EN": 6.74, "SF": 11.30, "SCD": 1.86, "VIF": 0.50, "Qabf": 0.67, "SSIM": 0.70},
        "table2": {"mAcc": 86.04, "mIoU": 75.09},
    },
    "fmb": {
        "task": "segformer",
        "table1": {"EN": 6.86, "SF": 14.16, "SCD": 1.76, "VIF": 0.43, "Qabf": 0.68, "SSIM": 0.75},
        "table2": {"mAcc": 67.17, "mIoU": 60.50},
        "table3": {  # ablations on FMB: fusion metrics
            "I": {"EN": 6.60, "SF": 13.73, "SCD": 1.58, "VIF": 0.39, "Qabf": 0.60, "SSIM": 0.72},
            "II": {"EN": 6.77, "SF": 11.65, "SCD": 1.63, "VIF": 0.37, "Qabf": 0.64, "SSIM": 0.73},
            "III": {"EN": 6.80, "SF": 13.85, "SCD": 1.70, "VIF": 0.41, "Qabf": 0.66, "SSIM": 0.73},
            "IV": {"EN": 6.82, "SF": 14.07, "SCD": 1.72, "VIF": 0.41, "Qabf": 0.67, "SSIM": 0.72},
            "V": {"EN": 6.75, "SF": 11.49, "SCD": 1.65, "VIF": 0.38, "Qabf": 0.62, "SSIM": 0.73},
            "none": {"EN": 6.86, "SF": 14.16, "SCD": 1.76, "VIF": 0.43, "Qabf": 0.68, "SSIM": 0.75},
        },
    },
    "m3fd": {
        "task": "yolov8",
        "table1": {"EN": 6.99, "SF": 14.49, "SCD": 1.83, "VIF": 0.41, "Qabf": 0.65, "SSIM": 0.72},
        "table2": {"mAP50": 86.27, "mAP75": 59.71},
    },
    "llvip": {
        "task": "yolov8",
        "table1": {"EN": 7.36, "SF": 16.38, "SCD": 1.75, "VIF": 0.46, "Qabf": 0.70, "SSIM": 0.67},
        "table2": {"mAP50": 95.00, "mAP75": 69.18},  # the paper's AP50 / AP75 of its one class
    },
}
"""TDFusion's numbers in the paper (Bai et al., CVPR 2025): Table 1 (fusion metrics), Table 2
(downstream, %), Table 3 (ablations on FMB)."""


def arm_name(ablation: str) -> str:
    return "tdfusion" if ablation == "none" else f"ablation_{ablation}"


def link_split(pairs: list[PairFiles], folder: Path, dry_run: bool = False) -> tuple[Path, Path]:
    """``folder/a`` and ``folder/b`` holding links to one split's sources, so that ``fuse`` and
    ``evaluate`` (which take two folders) see exactly that split (M3FD and LLVIP share folders
    across splits). ``dry_run``: the two paths only, nothing written."""
    a, b = folder / "a", folder / "b"
    if dry_run:
        return a, b
    for side, paths in ((a, [p.a for p in pairs]), (b, [p.b for p in pairs])):
        side.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = side / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return a, b


class Runner:
    """Prints each command as typed in a shell, runs it in this process (unless ``dry_run``)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def __call__(self, argv: list[str], done: Path | None = None) -> None:
        print("$ python examples/tdfusion/run.py " + shlex.join(argv), flush=True)
        if self.dry_run or (done is not None and done.exists()):
            return
        run_py(argv)


def reproduce(
    dataset: str,
    root: Path,
    out: Path,
    *,
    arms: list[str] | None = None,
    device: str | None = None,
    downstream_epochs: int = 300,
    overrides: list[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run the paper's protocol on one data set; returns (and writes as ``report.md`` and
    ``report.json``) each arm's fusion metrics and downstream scores beside the paper's."""
    arms = arms or ["none", "I"]
    task = PAPER[dataset]["task"]
    common = ["--quiet"] + (["--device", device] if device else [])
    run = Runner(dry_run)
    run(["check-data", "--dataset", dataset, "--root", str(root), "--task-net", task, "--quiet"])
    options = argparse.Namespace(dataset=dataset, root=str(root), split_dir=None)
    splits = {
        split: link_split(dataset_files(options, split), out / "sources" / split, dry_run)
        for split in ("train", "test")
    }
    config = ROOT / "configs" / f"{dataset}.yaml"
    for ablation in arms:
        run_dir = out / arm_name(ablation)
        run(
            ["train", "--config", str(config), f"root={root}", f"ablation={ablation}", *(overrides or [])]
            + ["--out", str(run_dir), *common],
            done=run_dir / "fusion.safetensors",
        )
        for split, (a, b) in splits.items():
            fused = run_dir / "fused" / split
            weights = run_dir / "fusion.safetensors"
            run(["fuse", "--weights", str(weights), "--a", str(a), "--b", str(b), "--out", str(fused), *common])
    a, b = splits["test"]
    fused_test = [f"{arm_name(x)}={out / arm_name(x) / 'fused' / 'test'}" for x in arms]
    run(["evaluate", "--fused", *fused_test, "--a", str(a), "--b", str(b), "--out", str(out / "table1"), *common])
    methods = [
        f"{arm_name(x)}:{out / arm_name(x) / 'fused' / 'train'}:{out / arm_name(x) / 'fused' / 'test'}" for x in arms
    ]
    run(
        ["downstream", "--dataset", dataset, "--root", str(root), "--task-net", task]
        + [arg for m in methods for arg in ("--method", m)]
        + ["--epochs", str(downstream_epochs), "--out", str(out / "table2"), *common]
    )
    return {} if dry_run else write_report(dataset, arms, out)


def write_report(dataset: str, arms: list[str], out: Path) -> dict[str, Any]:
    """``report.md`` / ``report.json``: Tables 1 and 2 (and 3 for FMB) with the paper's rows."""
    paper = PAPER[dataset]
    table1 = {
        name: json.loads((out / "table1" / name / "metrics.json").read_text())["mean"] for name in map(arm_name, arms)
    }
    table2 = json.loads((out / "table2" / "downstream.json").read_text())
    metrics, scores = list(paper["table1"]), list(paper["table2"])
    lines = [f"# {dataset.upper()}: this run against the paper", "", "| method | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    lines.append("| TDFusion (paper, Table 1) | " + " | ".join(f"{paper['table1'][m]:.2f}" for m in metrics) + " |")
    for ablation in arms:
        if ablation in paper.get("table3", {}) and ablation != "none":
            row = paper["table3"][ablation]
            lines.append(
                f"| ablation {ablation} (paper, Table 3) | " + " | ".join(f"{row[m]:.2f}" for m in metrics) + " |"
            )
    for name, mean in table1.items():
        lines.append(f"| {name} (this run) | " + " | ".join(f"{mean[m]:.2f}" for m in metrics) + " |")
    lines += ["", "| method | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
    lines.append("| TDFusion (paper, Table 2) | " + " | ".join(f"{paper['table2'][s]:.2f}" for s in scores) + " |")
    for name, result in table2.items():
        lines.append(f"| {name} (this run) | " + " | ".join(f"{result[s]:.2f}" for s in scores) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    report = {"paper": paper, "fusion_metrics": table1, "downstream": table2}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(PAPER))
    p.add_argument("--root", required=True, type=Path, help="the data set's folder as downloaded")
    p.add_argument("--out", required=True, type=Path, help="the runs, fused images, tables and report.md")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["none", "I"],
        choices=["none", "I", "II", "III", "IV", "V"],
        help="none: TDFusion; I-V: the ablations of Table 3",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is present)")
    p.add_argument("--downstream-epochs", type=int, default=300, help="task-network epochs per arm (paper: 300)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train settings (epochs=10 meta_iterations=50)")
    args = p.parse_args()
    reproduce(
        args.dataset,
        args.root,
        args.out,
        arms=args.arms,
        device=args.device,
        downstream_epochs=args.downstream_epochs,
        overrides=args.overrides,
        dry_run=args.dry_run,
    )
