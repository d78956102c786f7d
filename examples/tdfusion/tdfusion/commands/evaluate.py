"""``run.py evaluate``: the six fusion metrics of one or several methods' fused folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metaloss.fusion.image_io import read_grey
from metaloss.fusion.metrics import METRICS, evaluate_fusion

from ..catalog import matched_names
from ..data import find_image
from ..options import add_device_option
from ..reports import write_comparison

__all__ = ["add_parser", "evaluate", "method_names"]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The six metrics for each --fused folder; metrics.json, CSV and a markdown table in --out.

    Every image is scored before anything is written, so a missing or mis-sized fused image
    leaves no partial report behind.
    """
    device = torch.device(args.device)
    methods: dict[str, Any] = {}
    pairs = matched_names(Path(args.a), Path(args.b))
    for name, folder in method_names(args.fused).items():
        rows = []
        for pair in tqdm(pairs, desc=f"evaluate {name}", disable=args.quiet):
            pf = find_image(folder, pair.name)
            if pf is None:
                raise SystemExit(f"{folder} has no fused image for {pair.name}")
            f, a, b = (torch.from_numpy(read_grey(p)).to(device) for p in (pf, pair.a, pair.b))
            try:
                values = evaluate_fusion(f, a, b, args.convention)
            except ValueError as err:  # sizes that differ, an image too small for VIF
                raise SystemExit(f"{pf}: {err}") from None
            rows.append({"name": pair.name, **{k: float(v[0]) for k, v in values.items()}})
        mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
        methods[name] = {"folder": str(folder), "convention": args.convention, "images": rows, "mean": mean}
    out = Path(args.out)
    for name, result in methods.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "metrics.json").write_text(json.dumps(result, indent=2))
    write_comparison(out, {k: v["mean"] for k, v in methods.items()}, args.convention)
    print(
        f"evaluated {len(methods)} method(s) on {len(pairs)} pairs; wrote {out / 'comparison.md'}, "
        f"comparison.csv, comparison.png and <method>/metrics.json"
    )
    return methods


def method_names(specs: list[str]) -> dict[str, Path]:
    """A unique name per ``--fused`` folder: ``NAME=DIR`` as given, else the shortest trailing
    part of the path that tells it from the others (``runA/fused`` and ``runB/fused`` become
    ``runA_fused`` and ``runB_fused``). Two folders that cannot be told apart are an error."""
    given: list[tuple[str | None, Path]] = []
    for spec in specs:
        head, sep, rest = spec.partition("=")
        given.append((head, Path(rest)) if sep and head and "/" not in head else (None, Path(spec)))
    resolved = [p.resolve() for _, p in given]
    if len(set(resolved)) != len(resolved):
        raise SystemExit("--fused: the same folder is given twice")
    names: dict[str, Path] = {}
    for (given_name, folder), full in zip(given, resolved):
        name = given_name or ""
        if given_name is None:
            others = [r for r in resolved if r != full]
            for depth in range(1, len(full.parts) + 1):
                name = "_".join(full.parts[-depth:])
                if not any("_".join(o.parts[-depth:]) == name for o in others):
                    break
        if name in names:
            raise SystemExit(f"--fused: two methods are named {name!r}; name them with NAME=DIR")
        names[name] = folder
    return names


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the subparsers ``sub``."""
    p = sub.add_parser("evaluate", help="six fusion metrics for one or several methods' fused folders")
    p.add_argument(
        "--fused",
        nargs="+",
        required=True,
        metavar="[NAME=]DIR",
        help="one folder per method; named NAME, else by the shortest distinguishing end of its path",
    )
    p.add_argument("--a", required=True, help="infrared folder")
    p.add_argument("--b", required=True, help="visible folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--convention",
        choices=("mean", "sum"),
        default="mean",
        help="two-source VIF/SSIM: mean (TDFusion) or sum (CDDFuse)",
    )
    add_device_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=evaluate)
    return p
