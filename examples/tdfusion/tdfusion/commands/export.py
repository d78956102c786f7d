"""``run.py export``: a fusion checkpoint as ONNX (dynamic batch, height and width) or safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from metaloss.checkpoint import save_safetensors
from metaloss.fusion.export import export_onnx

from ..networks import load_fusion_network

__all__ = ["add_parser", "export"]


def export(args: argparse.Namespace) -> Path:
    """Write a fusion checkpoint (ours or the authors') as ONNX or as safetensors."""
    try:
        model = load_fusion_network(args.weights).eval()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--weights: {err}") from None
    if args.format == "onnx":
        return export_onnx(model, args.out)
    return save_safetensors(model.state_dict(), args.out)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``export`` on the subparsers ``sub``."""
    p = sub.add_parser("export", help="write a fusion checkpoint as ONNX (dynamic height and width) or safetensors")
    p.add_argument("--weights", required=True, help="our checkpoint (last.pt, fusion.safetensors) or a released .pth")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx")
    p.add_argument("--out", required=True, help="the file to write (.onnx or .safetensors)")
    p.set_defaults(func=export)
    return p
