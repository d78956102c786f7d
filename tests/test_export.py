"""Deployment formats round-trip: the released ReFusion exported to ONNX (dynamic height and width)
and run by onnxruntime matches torch on MSRS pairs; `fuse --backend onnxruntime` writes what the
torch backend writes; `export --format safetensors` gives weights `fuse` reads to the same output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tdfusion.cli import main

from metaloss.fusion import ReFusion, load_released_weights
from metaloss.fusion.export import OnnxFusion
from metaloss.fusion.image_io import read_bgr, to_ycrcb

pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxscript, onnxruntime) is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    weights = shared_data / "ReFusion" / "ReFusion_IVIF.pth"
    out = tmp_path_factory.mktemp("export") / "refusion.onnx"
    main(["export", "--weights", str(weights), "--format", "onnx", "--out", str(out)])
    return weights, out


def _pairs(shared_data: Path, n: int) -> list[tuple[Path, Path]]:
    ir = sorted((shared_data / "MSRS" / "test" / "ir").glob("*.png"))[:n]
    return [(p, shared_data / "MSRS" / "test" / "vi" / p.name) for p in ir]


def test_onnxruntime_matches_torch_on_msrs_pairs_at_their_own_size(
    exported: tuple[Path, Path], shared_data: Path
) -> None:
    weights, onnx_file = exported
    torch_model = load_released_weights(ReFusion(), weights).eval()
    onnx_model = OnnxFusion(onnx_file)
    for ir, vi in _pairs(shared_data, 2):
        a, b = to_ycrcb(read_bgr(ir))[..., 0], to_ycrcb(read_bgr(vi))[..., 0]
        x = torch.from_numpy(np.stack([a, b])[None].astype(np.float32) / 255.0)
        with torch.no_grad():
            reference = torch_model(x)
        got = onnx_model(x)
        assert got.shape == reference.shape == (1, 1, *a.shape)
        assert float((got - reference).abs().max()) <= 1e-4


def test_fuse_with_the_onnxruntime_backend_writes_what_torch_writes(
    exported: tuple[Path, Path], shared_data: Path, tmp_path: Path
) -> None:
    weights, onnx_file = exported
    (ir, vi) = _pairs(shared_data, 1)[0]
    for backend, source in (("torch", weights), ("onnxruntime", onnx_file)):
        argv = ["fuse", "--weights", str(source), "--a", str(ir), "--b", str(vi), "--out", str(tmp_path / backend)]
        main([*argv, "--backend", backend, "--device", "cpu", "--quiet"])
    a = cv2.imread(str(tmp_path / "torch" / ir.name), cv2.IMREAD_GRAYSCALE)
    b = cv2.imread(str(tmp_path / "onnxruntime" / ir.name), cv2.IMREAD_GRAYSCALE)
    assert a is not None and b is not None
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_safetensors_export_fuses_like_the_released_weights(shared_data: Path, tmp_path: Path) -> None:
    weights = shared_data / "ReFusion" / "ReFusion_IVIF.pth"
    converted = tmp_path / "refusion.safetensors"
    main(["export", "--weights", str(weights), "--format", "safetensors", "--out", str(converted)])
    x = torch.rand(1, 2, 40, 48)
    with torch.no_grad():
        reference = load_released_weights(ReFusion(), weights).eval()(x)
        again = load_released_weights(ReFusion(), converted).eval()(x)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)


def test_the_onnxruntime_backend_names_a_file_that_is_not_onnx(shared_data: Path, tmp_path: Path) -> None:
    (ir, vi) = _pairs(shared_data, 1)[0]
    pth = shared_data / "ReFusion" / "ReFusion_IVIF.pth"
    argv = ["fuse", "--weights", str(pth), "--a", str(ir), "--b", str(vi), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--weights:.*ReFusion_IVIF.pth"):
        main([*argv, "--backend", "onnxruntime"])
