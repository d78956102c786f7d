"""The six fusion metrics against the paper evaluator's values on the 28 MSRS sample pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metaloss.fusion.image_io import read_grey
from metaloss.fusion.metrics import evaluate_fusion, ssim, vif

MATCHED = ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM")


def _cases(shared_data: Path):
    reference = json.loads((shared_data / "metrics/msrs_reference.json").read_text())
    paths = {p.name: p for p in (shared_data / "MSRS").glob("*/ir/*.png")}
    pairs = {}
    for row in reference:
        ir = paths[row["pair"]]
        if row["pair"] not in pairs:
            pairs[row["pair"]] = (read_grey(ir), read_grey(ir.parent.parent / "vi" / ir.name))
        a, b = pairs[row["pair"]]
        fused = np.round(0.5 * a + 0.5 * b) if row["fused"] == "mean" else np.maximum(a, b)
        yield row, fused, a, b


def test_metrics_match_the_reference_evaluator(shared_data: Path) -> None:
    rows = list(_cases(shared_data))
    assert len(rows) == 56
    fused, a, b = (torch.from_numpy(np.stack([r[i] for r in rows])) for i in (1, 2, 3))
    values = evaluate_fusion(fused, a, b)  # one batched call for all 56 images
    for i, (row, *_) in enumerate(rows):
        for name in MATCHED:
            assert values[name][i].item() == pytest.approx(row[name], rel=1e-4), (row["pair"], row["fused"], name)


def test_sum_convention_doubles_the_two_source_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    f, a, b = (torch.randint(0, 256, (2, 96, 96), generator=g).double() for _ in range(3))
    torch.testing.assert_close(vif(f, a, b, "sum"), 2 * vif(f, a, b, "mean"))
    torch.testing.assert_close(ssim(f, a, b, "sum"), 2 * ssim(f, a, b, "mean"))
    with pytest.raises(ValueError, match="convention"):
        evaluate_fusion(f, a, b, "median")  # type: ignore[arg-type]


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    f, a = (torch.randint(0, 256, (33, 47), generator=g).to(torch.uint8) for _ in range(2))
    expected = structural_similarity(f.numpy(), a.numpy())
    assert ssim(f, a, a).item() == pytest.approx(expected, rel=1e-6)  # float32 pooling: ~1e-8 measured


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match="must share one shape"):
        evaluate_fusion(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, 6))
