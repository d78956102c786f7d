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


def _vifp_direct(ref: torch.Tensor, dist: torch.Tensor, sigma_nsq: float = 2.0, eps: float = 1e-10) -> float:
    """VIF-P written plainly from the definition: float64 direct 'valid' filtering, masks in order."""

    def filt(x: torch.Tensor, n: int) -> torch.Tensor:
        t = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-(t**2) / (2 * (n / 5) ** 2))
        w = torch.outer(g, g) / torch.outer(g, g).sum()
        return torch.nn.functional.conv2d(x[None, None], w[None, None])[0, 0]

    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        if scale > 1:
            ref, dist = filt(ref, n)[::2, ::2], filt(dist, n)[::2, ::2]
        mu1, mu2 = filt(ref, n), filt(dist, n)
        s1 = (filt(ref * ref, n) - mu1 * mu1).clamp(min=0)
        s2 = (filt(dist * dist, n) - mu2 * mu2).clamp(min=0)
        s12 = filt(ref * dist, n) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g[s1 < eps], sv[s1 < eps] = 0, s2[s1 < eps]
        s1[s1 < eps] = 0
        g[s2 < eps], sv[s2 < eps] = 0, 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= eps] = eps
        num += torch.log10(1 + g * g * s1 / (sv + sigma_nsq)).sum().item()
        den += torch.log10(1 + s1 / sigma_nsq).sum().item()
    return num / den


@pytest.mark.parametrize("shape", [(57, 77), (75, 99), (64, 45), (130, 162)])
def test_vif_matches_direct_filtering_at_any_size(shape: tuple[int, int]) -> None:
    """Odd and prime-factor sizes exercise the strided downsampling between scales (its last
    row and column); flat blocks and a fused image equal to one source in places exercise every
    mask (s1 < eps, s2 < eps, negative gain). The reference here filters with the 2-D window
    directly, ours with separable 1-D passes."""
    g = torch.Generator().manual_seed(shape[0])
    a, b = (torch.randint(0, 256, shape, generator=g).double() for _ in range(2))
    a[: shape[0] // 2, : shape[1] // 2] = 40.0  # flat in A
    fused = torch.where(torch.rand(shape, generator=g) < 0.5, a, 255 - b)  # anticorrelated with B in places
    fused[shape[0] // 2 :, shape[1] // 2 :] = 200.0  # flat in F
    expected = (_vifp_direct(a, fused) + _vifp_direct(b, fused)) / 2
    assert vif(fused, a, b).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("per_pass", [2, 5])
def test_batched_passes_give_the_one_at_a_time_results(per_pass: int) -> None:
    """The accelerator path (several images per pass) computes what the CPU path (one) does."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 256, (5, 48, 61), generator=g).float() for _ in range(2))
    a[1, :20, :30] = 17.0  # flat blocks in some images only
    fused = torch.where(torch.rand(a.shape, generator=g) < 0.5, a, b)
    one = evaluate_fusion(fused, a, b, images_per_pass=1)
    batched = evaluate_fusion(fused, a, b, images_per_pass=per_pass)
    for name in one:  # Q^AB/F's float32 maps are summed in another order when batched: ~1e-9
        torch.testing.assert_close(batched[name], one[name], rtol=1e-8, atol=0, msg=name)


def test_integer_images_give_the_float_results() -> None:
    g = torch.Generator().manual_seed(2)
    f, a, b = (torch.randint(0, 256, (2, 41, 52), generator=g).to(torch.uint8) for _ in range(3))
    from_uint8 = evaluate_fusion(f, a, b)
    from_float = evaluate_fusion(f.float(), a.float(), b.float())
    for name in from_uint8:
        torch.testing.assert_close(from_uint8[name], from_float[name], rtol=1e-12, atol=0)


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    f, a = (torch.randint(0, 256, (33, 47), generator=g).to(torch.uint8) for _ in range(2))
    expected = structural_similarity(f.numpy(), a.numpy())
    assert ssim(f, a, a).item() == pytest.approx(expected, rel=1e-6)  # float32 pooling: ~1e-8 measured


def test_shape_mismatch_and_small_images_are_named() -> None:
    with pytest.raises(ValueError, match="must share one shape"):
        evaluate_fusion(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"at least 41x41 pixels .* got \(40, 52\)"):
        evaluate_fusion(torch.zeros(40, 52), torch.zeros(40, 52), torch.zeros(40, 52))


def test_kept_buffers_are_per_thread_and_can_be_released() -> None:
    """VIF keeps its maps in buffers between calls; two threads must not share them."""
    from concurrent.futures import ThreadPoolExecutor

    from metaloss.fusion import metrics

    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 1, 64, 80), generator=g).double() for _ in range(6)]  # (F, A, B) each
    alone = [vif(x[0], x[1], x[2]) for x in images]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):  # interleaved calls on two threads
            together = list(pool.map(lambda x: vif(x[0], x[1], x[2]), images))
            for expected, got in zip(alone, together, strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert metrics._SCRATCH.buffers  # this thread's buffers
    metrics.release_scratch()
    assert not metrics._SCRATCH.buffers
