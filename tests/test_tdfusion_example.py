"""The TDFusion example on real components: SegFormer, YOLOv8, a smp U-Net, real MSRS pairs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from tdfusion.cli import build_parser, main
from tdfusion.commands.train import config_parser
from tdfusion.data import FusionDataset, SceneList, collate
from tdfusion.datasets import msrs_files
from tdfusion.networks import (
    LogitPrior,
    PerPixelPlusUnetGenerator,
    UnetLossGenerator,
    build_loss,
    load_fusion_network,
)
from tdfusion.reports import write_demo_summary
from tdfusion.run_config import expand_config
from tdfusion.tasks import TaskName, build_task

from metaloss import InnerSGD, MetaStep, MetaTrainer, MetaTrainerConfig, SourcesAdapter
from metaloss.fusion import LossGenerator, ReFusion, tdfusion_loss
from metaloss.fusion.image_io import read_grey, read_ycrcb
from tests.samples import downsized_pairs, msrs_tree
from tests.toy import seg_loss

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tdfusion"

MSRS_CLASSES = 9


class _Recorder:
    def __init__(self) -> None:
        self.task_losses: list[float] = []
        self.model_losses: list[float] = []
        self.outer: list[float] = []

    def on_model_step(self, trainer, stats) -> None:
        self.task_losses.append(stats.task_loss)
        self.model_losses.append(stats.model_loss)

    def on_meta_step(self, trainer, stats) -> None:
        self.outer.append(stats.outer_loss)


@pytest.mark.parametrize(
    ("task_net", "task_size"), [("segformer", (64, 96)), ("unet", (64, 96)), ("yolov8", (96, 128))]
)
def test_both_tasks_train_on_real_msrs_pairs(shared_data: Path, tmp_path: Path, task_net: TaskName, task_size) -> None:
    root = msrs_tree(shared_data, tmp_path, {"train": ["00001D", "00003N"]})
    torch.manual_seed(0)  # before any network is built: the test is deterministic
    task = build_task(task_net, MSRS_CLASSES if task_net != "yolov8" else 3)
    # Centre crops (train=False): a small overfit on fixed inputs, so the losses must fall.
    dataset = FusionDataset(SceneList(msrs_files(root, "train")), task.kind, crop=48, task_size=task_size, train=False)
    sample = collate([dataset[0], dataset[1]])
    if task.kind == "det":
        assert len(sample["det"]["bboxes"]) >= 2 and float(sample["det"]["bboxes"].max()) <= 1.0
    else:
        assert set(sample["mask"].unique().tolist()) <= {0, 2, 4}
    loss = tdfusion_loss(LossGenerator())
    recorder = _Recorder()
    trainer = MetaTrainer(
        ReFusion(),
        loss,
        task.model,
        task.loss,
        dataset,
        config=MetaTrainerConfig(epochs=6, meta_iterations=1, batch_size=2, lr=1e-3, outer_lr=1e-3, progress=False),
        collate_fn=collate,
        adapter=SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b")),
        inner=InnerSGD(1e-3),
        task_inner=InnerSGD(1e-3),
        callbacks=[recorder],
    )
    trainer.fit()
    losses = recorder.task_losses + recorder.model_losses + recorder.outer
    assert len(recorder.task_losses) == 6 and len(recorder.outer) == 6
    assert all(np.isfinite(losses))
    print(task_net, recorder.task_losses, recorder.model_losses)
    assert recorder.task_losses[-1] < recorder.task_losses[0], recorder.task_losses
    assert recorder.model_losses[-1] < recorder.model_losses[0], recorder.model_losses


def test_fuse_command_with_released_weights(shared_data: Path, tmp_path: Path) -> None:
    pairs = shared_data / "ReFusion/test_cases/IVIF"
    out = tmp_path / "fused"
    fuse = ["fuse", "--weights", str(shared_data / "ReFusion/ReFusion_IVIF.pth"), "--raw", "--quiet"]
    fuse += ["--a", str(pairs / "infrared/00710N.png"), "--b", str(pairs / "visible/00710N.png")]
    main([*fuse, "--out", str(out)])
    raw = np.load(out / "00710N.npy")
    reference = np.load(shared_data / "ReFusion/ivif_raw_outputs.npz")["00710N"]
    assert raw.dtype == np.float32 and np.abs(raw - reference).max() < 5e-5
    grey = cv2.imread(str(out / "00710N.png"), cv2.IMREAD_UNCHANGED)
    rgb = cv2.imread(str(out / "rgb/00710N.png"), cv2.IMREAD_UNCHANGED)
    assert grey is not None and rgb is not None
    assert grey.ndim == 2 and grey.min() == 0 and grey.max() == 255  # stretched as the release saves
    assert rgb.shape == (*grey.shape, 3) and not np.array_equal(rgb[..., 0], rgb[..., 2])
    _assert_chroma_kept(rgb, grey, read_ycrcb(pairs / "visible/00710N.png"))
    low = tmp_path / "bf16"
    main([*fuse, "--out", str(low), "--bf16", "--device", "cpu"])
    bf16 = np.load(low / "00710N.npy")
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - reference).max() < 5e-2  # opt-in, lower precision


def test_fuse_a_folder_reads_ahead_and_writes_behind_in_order(shared_data: Path, tmp_path: Path) -> None:
    """A folder fused with overlapped reading and writing gives each pair exactly what fusing it
    alone gives; a pair whose sizes differ stops the run with both files named."""
    ir, vi = downsized_pairs(shared_data / "MSRS/test/ir", shared_data / "MSRS/test/vi", tmp_path / "small", side=64)
    names = sorted(p.stem for p in ir.iterdir())[:4]
    for folder in (ir, vi):
        for extra in set(p.stem for p in folder.iterdir()) - set(names):
            (folder / f"{extra}.png").unlink()
    weights = ["--weights", str(shared_data / "ReFusion/ReFusion_IVIF.pth"), "--raw", "--quiet"]
    main(["fuse", *weights, "--a", str(ir), "--b", str(vi), "--out", str(tmp_path / "all")])
    assert sorted(p.stem for p in (tmp_path / "all").glob("*.png")) == names
    for name in names:
        alone = tmp_path / "alone" / name
        main(["fuse", *weights, "--a", str(ir / f"{name}.png"), "--b", str(vi / f"{name}.png"), "--out", str(alone)])
        np.testing.assert_array_equal(np.load(tmp_path / "all" / f"{name}.npy"), np.load(alone / f"{name}.npy"))
        for image in (f"{name}.png", f"rgb/{name}.png"):
            assert (tmp_path / "all" / image).read_bytes() == (alone / image).read_bytes(), image
    cv2.imwrite(str(vi / f"{names[2]}.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(SystemExit, match=f"{names[2]}.png and .*{names[2]}.png differ in size"):
        main(["fuse", *weights, "--a", str(ir), "--b", str(vi), "--out", str(tmp_path / "bad")])


def _assert_chroma_kept(rgb: np.ndarray, grey: np.ndarray, source: np.ndarray) -> None:
    """The colour image is the fused luminance with the colour source's chroma (the release's
    recolouring), within 2 grey levels wherever no RGB channel was clipped."""
    ycrcb = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_BGR2YCrCb)
    unclipped = (rgb.min(axis=2) > 0) & (rgb.max(axis=2) < 255)
    assert unclipped.mean() > 0.5
    assert np.abs(ycrcb[..., 0] - grey)[unclipped].max() <= 2.0
    assert np.percentile(np.abs(ycrcb[..., 1:] - source[..., 1:])[unclipped], 99) <= 2.0


def test_colour_comes_from_the_one_colour_source_and_a_grey_pair_has_none(shared_data: Path, tmp_path: Path) -> None:
    """PET (colour) with MRI (grey), in the release's order: the fused colour is PET's, with full
    saturation (the 0.5 chroma mid-point of OpenCV's float YCrCb, not 128); two grey sources give
    no rgb/ image."""
    mif = shared_data / "ReFusion/test_cases/MIF"
    out = tmp_path / "mif"
    weights = str(shared_data / "ReFusion/ReFusion_MIF.pth")
    main(
        ["fuse", "--weights", weights, "--a", str(mif / "CT_PET_SPECT/MRI_PET_14.png")]
        + ["--b", str(mif / "MRI/MRI_PET_14.png"), "--out", str(out), "--quiet"]
    )
    rgb = cv2.imread(str(out / "rgb/MRI_PET_14.png"), cv2.IMREAD_UNCHANGED)
    grey = cv2.imread(str(out / "MRI_PET_14.png"), cv2.IMREAD_UNCHANGED)
    pet_bgr = cv2.imread(str(mif / "CT_PET_SPECT/MRI_PET_14.png"))
    assert rgb is not None and grey is not None and pet_bgr is not None
    pet = read_ycrcb(mif / "CT_PET_SPECT/MRI_PET_14.png")
    _assert_chroma_kept(rgb, grey, pet)
    spread = rgb.astype(np.float32).max(axis=2) - rgb.astype(np.float32).min(axis=2)
    pet_spread = pet_bgr.astype(np.float32).max(axis=2) - pet_bgr.astype(np.float32).min(axis=2)
    assert spread.mean() > 0.7 * pet_spread.mean()  # not desaturated
    grey_out = tmp_path / "grey"
    main(
        ["fuse", "--weights", weights, "--a", str(mif / "MRI/MRI_PET_14.png")]
        + ["--b", str(mif / "MRI/MRI_PET_14.png"), "--out", str(grey_out), "--quiet"]
    )
    assert (grey_out / "MRI_PET_14.png").is_file() and not (grey_out / "rgb").exists()


def test_fuse_loads_an_ablation_v_checkpoint_from_train(shared_data: Path, tmp_path: Path) -> None:
    """`train --ablation V` saves the weighted-sum network; `fuse` recognises it from its keys."""
    main(
        ["train", "--ablation", "V", "--epochs", "1", "--meta-iterations", "1", "--model-iterations", "1"]
        + ["--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48", "--out", str(tmp_path / "v"), "--quiet"]
    )
    pairs = shared_data / "ReFusion/test_cases/IVIF"
    out = tmp_path / "fused"
    args = ["--a", str(pairs / "infrared/00710N.png"), "--b", str(pairs / "visible/00710N.png"), "--out", str(out)]
    main(["fuse", "--weights", str(tmp_path / "v" / "last.pt"), *args, "--raw", "--quiet"])
    a, b = (read_ycrcb(pairs / name)[..., 0] / 255.0 for name in ("infrared/00710N.png", "visible/00710N.png"))
    raw = np.load(out / "00710N.npy")
    between = (raw >= np.minimum(a, b) - 1e-5) & (raw <= np.maximum(a, b) + 1e-5)
    assert between.all()  # a convex combination of the two sources, pixel by pixel
    with pytest.raises(SystemExit, match="--weights"):
        main(["fuse", "--weights", str(tmp_path / "missing.pt"), *args, "--quiet"])


def test_train_under_torchrun_with_two_processes(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 run.py train` (gloo on CPU): one checkpoint, written by rank 0
    with both ranks' RNG states and unwrapped weights that `fuse` loads; logs written once."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(EXAMPLE / "run.py"), "train", "--device", "cpu", "--epochs", "1", "--meta-iterations", "2"]
    command += ["--model-iterations", "2", "--synthetic-train", "8", "--crop", "32", "--task-size", "32", "48"]
    done = subprocess.run(
        [*command, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},  # torchelastic's run files
        timeout=3600,  # a hang guard only: a loaded machine must not fail this test
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["global_step"] == 4
    assert isinstance(load_fusion_network(out / "last.pt"), ReFusion)
    assert len((out / "logs" / "meta.csv").read_text().splitlines()) == 1 + 2  # header + 2 meta steps


def test_evaluate_keeps_methods_whose_folders_share_a_name(shared_data: Path, tmp_path: Path) -> None:
    """runA/fused and runB/fused (the usual layout of runs) are two methods, not one overwritten."""
    a_dir, b_dir = tmp_path / "ir", tmp_path / "vi"
    runs = {"runA": tmp_path / "runA" / "fused", "runB": tmp_path / "runB" / "fused"}
    for d in (a_dir, b_dir, *runs.values()):
        d.mkdir(parents=True)
    shutil.copy(shared_data / "MSRS/train/ir/00001D.png", a_dir)
    shutil.copy(shared_data / "MSRS/train/vi/00001D.png", b_dir)
    a, b = read_grey(a_dir / "00001D.png"), read_grey(b_dir / "00001D.png")
    cv2.imwrite(str(runs["runA"] / "00001D.png"), np.maximum(a, b).astype(np.uint8))
    cv2.imwrite(str(runs["runB"] / "00001D.png"), np.round(0.5 * a + 0.5 * b).astype(np.uint8))
    common = ["--a", str(a_dir), "--b", str(b_dir), "--quiet"]
    main(["evaluate", "--fused", str(runs["runA"]), str(runs["runB"]), "--out", str(tmp_path / "e"), *common])
    table = (tmp_path / "e" / "comparison.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["runA_fused", "runB_fused"]
    assert table[1] != table[2].replace("runB", "runA")  # two different results
    main(["evaluate", "--fused", f"max={runs['runA']}", f"mean={runs['runB']}", "--out", str(tmp_path / "n"), *common])
    assert [r.split(",")[0] for r in (tmp_path / "n" / "comparison.csv").read_text().splitlines()[1:]] == [
        "max",
        "mean",
    ]
    with pytest.raises(SystemExit, match="named 'x'"):
        main(["evaluate", "--fused", f"x={runs['runA']}", f"x={runs['runB']}", "--out", str(tmp_path / "x"), *common])


def test_evaluate_command_compares_methods(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_dir, b_dir = tmp_path / "ir", tmp_path / "vi"
    methods = {"mean": tmp_path / "mean", "max": tmp_path / "max"}
    for d in (a_dir, b_dir, *methods.values()):
        d.mkdir()
    for name in ("00001D", "00003N"):
        shutil.copy(shared_data / "MSRS/train/ir" / f"{name}.png", a_dir)
        shutil.copy(shared_data / "MSRS/train/vi" / f"{name}.png", b_dir)
        a, b = read_grey(a_dir / f"{name}.png"), read_grey(b_dir / f"{name}.png")
        cv2.imwrite(str(methods["mean"] / f"{name}.png"), np.round(0.5 * a + 0.5 * b).astype(np.uint8))
        cv2.imwrite(str(methods["max"] / f"{name}.png"), np.maximum(a, b).astype(np.uint8))
    out = tmp_path / "eval"
    main(
        [
            "evaluate",
            "--fused",
            str(methods["mean"]),
            str(methods["max"]),
            "--a",
            str(a_dir),
            "--b",
            str(b_dir),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert f"wrote {out / 'comparison.md'}" in capsys.readouterr().out  # says what it wrote
    report = json.loads((out / "max" / "metrics.json").read_text())
    assert report["convention"] == "mean" and [r["name"] for r in report["images"]] == ["00001D", "00003N"]
    assert set(report["mean"]) == {"EN", "SF", "SCD", "VIF", "Qabf", "SSIM"}
    table = (out / "comparison.md").read_text()
    assert "| mean |" in table and "| max |" in table and "**" in table and "convention: mean" in table
    assert (out / "comparison.png").stat().st_size > 1000
    cv2.imwrite(str(methods["max"] / "00003N.png"), np.zeros((100, 120), np.uint8))  # not the sources' size
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match=r"max/00003N.png: .*must share one shape"):
        main(
            ["evaluate", "--fused", str(methods["mean"]), str(methods["max"]), "--a", str(a_dir), "--b", str(b_dir)]
            + ["--out", str(fresh)]
        )
    assert not fresh.exists()  # the first method's scores are not left behind half-written
    with pytest.raises(SystemExit, match="no partner"):
        (b_dir / "00003N.png").unlink()
        main(["evaluate", "--fused", str(methods["max"]), "--a", str(a_dir), "--b", str(b_dir), "--out", str(out)])


def test_the_example_puts_one_package_on_the_import_path() -> None:
    """run.py adds only `tdfusion`: no flat `data` or `datasets` module shadows an installed package
    (transformers probes for Hugging Face's `datasets`)."""
    probe = (
        "import importlib.util, runpy, sys\n"
        f"sys.argv = ['run.py', '--help']\n"
        f"try:\n    runpy.run_path({str(EXAMPLE / 'run.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "for name in ('data', 'datasets', 'tasks', 'study'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
        "print('tdfusion', importlib.util.find_spec('tdfusion').origin)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=EXAMPLE
    ).stdout.splitlines()
    origins = dict(
        line.split(" ", 1)
        for line in lines
        if line.split(" ", 1)[0] in {"data", "datasets", "tasks", "study", "tdfusion"}
    )
    assert origins["tdfusion"] == str(EXAMPLE / "tdfusion" / "__init__.py")
    for name in ("data", "datasets", "tasks", "study"):
        assert str(EXAMPLE) not in origins[name], f"{name} resolves to the example: {origins[name]}"


@pytest.mark.parametrize("command", ["demo", "train", "fuse", "export", "evaluate", "check-data", "downstream"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "--out" in text and len(text.splitlines()) > 5
    # Each option's entry (its first line starts "  -", its help continues indented) names its
    # default once at most, and never as None.
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for entry in entries:
        flat = " ".join(entry.split())
        assert "(default: None)" not in flat, flat
        assert flat.count("default") <= 1 or "(default:" not in flat, flat


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command, at a tiny size: both arms trained, each scored by a fresh
    SegFormer on its fused scenes, the learned maps measured, the verdict written."""
    out = tmp_path / "demo"
    main(
        ["--quiet", "--epochs", "1", "--warmup-epochs", "0", "--meta-iterations", "2", "--synthetic-train", "4"]
        + ["--synthetic-test", "2", "--task-epochs", "1", "--crop", "32", "--out", str(out)]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())  # the last line is the report folder
    results = json.loads((out / "metrics.json").read_text())
    arms = {"tdfusion", "fixed_half", "fixed_infrared"}
    assert set(results) == arms | {"convention", "task_net", "task_seed", "task_repeats", "virtual_step", "generator"}
    assert (results["task_seed"], results["task_repeats"]) == (1000, 1)  # seeded apart from the run's T (seed 0)
    assert results["virtual_step"] == "output"  # the demo's default: a virtual step of the fused image
    assert results["generator"] == "per_pixel"  # the paper's G
    for arm in arms:
        assert set(results[arm]["fusion_metrics"]) == {"EN", "SF", "SCD", "VIF", "Qabf", "SSIM"}
        downstream = results[arm]["downstream"]
        assert 0 <= downstream["mIoU"] <= 100 and "background" in downstream["per_class"]
        assert len(list((out / arm / "fused").glob("*.png"))) == 2
        assert (out / arm / "last.pt").is_file() and (out / arm / "logs" / "model.csv").is_file()
    assert (out / "tdfusion" / "logs" / "meta.csv").is_file()  # the meta phase ran
    weights = results["tdfusion"]["weights_at"]
    assert all(0 <= weights[k] <= 1 for k in ("target_infrared", "marking_visible", "marking_brighter"))
    assert "weights_at" not in results["fixed_half"] and "weights_at" not in results["fixed_infrared"]
    summary = (out / "summary.md").read_text()
    assert "Verdict" in summary and "fixed w = 1/2" in summary and f"{weights['target_infrared']:.2f}" in summary
    assert f"| **mIoU** | **{results['tdfusion']['downstream']['mIoU']:.1f}** |" in summary
    assert f"against {results['fixed_infrared']['downstream']['mIoU']:.1f} mIoU" in summary  # the infrared-only arm
    assert f"| the brighter source on markings | {weights['marking_brighter']:.2f} |" in summary
    assert "--virtual-step output" in summary  # the report says its meta-gradient is not the paper's
    assert "--generator" not in summary
    write_demo_summary(tmp_path, {**results, "generator": "per_pixel+unet"}, 1.0)  # a G not the paper's is named
    assert "(`--generator per_pixel+unet`)" in (tmp_path / "summary.md").read_text()
    assert "train a fresh segformer that is scored" in summary
    write_demo_summary(tmp_path, {**results, "task_repeats": 3}, 1.0)  # --task-repeats 3: the mean of three
    assert "train 3 fresh segformer networks, seeded alike in every arm," in (tmp_path / "summary.md").read_text()
    assert (out / "weights.png").stat().st_size > 1000


def test_demo_refuses_a_detection_network_before_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="segmentation"):
        main(["demo", "--task-net", "yolov8", "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("ablation", ["II", "III", "IV", "V"])
def test_ablations_train(tmp_path: Path, ablation: str) -> None:
    main(
        [
            "train",
            "--quiet",
            "--ablation",
            ablation,
            "--epochs",
            "1",
            "--meta-iterations",
            "1",
            "--synthetic-train",
            "4",
            "--crop",
            "32",
            "--task-size",
            "32",
            "48",
            "--swap",
            "--flip",
            "--out",
            str(tmp_path),
        ]
    )
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 1, "phase": "meta", "step": 0}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["ablation"] == ablation


def test_fixed_weights_train_on_the_chosen_source(tmp_path: Path) -> None:
    """--ablation I --fixed-weights 1 0: the infrared-only baseline; its loss weighs infrared alone,
    and the run's config.yaml repeats it."""
    args = ["train", "--quiet", "--ablation", "I", "--fixed-weights", "1", "0", "--epochs", "1"]
    args += ["--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48"]
    main([*args, "--out", str(tmp_path / "run")])
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["ablation"] == "I" and config["fixed_weights"] == [1.0, 0.0]
    argv = expand_config(config_parser(), ["--config", str(tmp_path / "run" / "config.yaml")])
    parsed = build_parser().parse_args(["train", *argv, "--out", str(tmp_path / "again")])
    scene = torch.rand(1, 1, 8, 8)
    weights = build_loss(parsed).weights([scene, scene])
    assert weights[:, 0].eq(1).all() and weights[:, 1].eq(0).all()
    default = build_loss(build_parser().parse_args(["train", "--ablation", "I", "--out", "x"])).weights([scene, scene])
    assert default.eq(0.5).all()


def test_a_global_generator_learns_one_weight_per_source(tmp_path: Path) -> None:
    """--generator global: the baseline with one learned weight per source, the same everywhere."""
    main(
        ["train", "--quiet", "--generator", "global", "--epochs", "1", "--meta-iterations", "3"]
        + ["--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48", "--out", str(tmp_path)]
    )
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert list(state["loss"]) == ["generator.logits"]
    logits = state["loss"]["generator.logits"]
    assert logits.shape == (2,) and bool(logits.abs().max() > 0), "the meta steps did not move the weights"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["generator"] == "global"


def test_loss_from_trains_a_fresh_fusion_network_under_a_learned_loss(tmp_path: Path) -> None:
    """--loss-from RUN/last.pt: the learned loss of a trained run, loaded; with --warmup-epochs 0
    and --frozen-loss-epochs equal to --epochs it stays as loaded while a fresh F trains under it.
    A file of the loss's state dict alone loads the same way, for the paper's generator too."""
    tiny = ["--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48", "--quiet", "--epochs", "1"]
    main(["train", "--generator", "global", "--meta-iterations", "3", *tiny, "--out", str(tmp_path / "learned")])
    learned = torch.load(tmp_path / "learned" / "last.pt", weights_only=True)
    assert bool(learned["loss"]["generator.logits"].abs().max() > 0), "the meta steps did not move the weights"
    reuse = ["--loss-from", str(tmp_path / "learned" / "last.pt"), "--warmup-epochs", "0", "--frozen-loss-epochs", "1"]
    main(["train", "--generator", "global", "--seed", "1", *reuse, *tiny, "--out", str(tmp_path / "reused")])
    reused = torch.load(tmp_path / "reused" / "last.pt", weights_only=True)
    torch.testing.assert_close(reused["loss"], learned["loss"], rtol=0, atol=0)
    assert yaml.safe_load((tmp_path / "reused" / "config.yaml").read_text())["loss_from"] == reuse[1]

    torch.manual_seed(3)
    trained = build_loss(build_parser().parse_args(["train", "--out", "x"]))  # the paper's generator
    for p in trained.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.save(trained.state_dict(), tmp_path / "loss.pt")
    torch.manual_seed(4)
    loaded = build_loss(build_parser().parse_args(["train", "--loss-from", str(tmp_path / "loss.pt"), "--out", "x"]))
    a, b = torch.rand(2, 1, 24, 40), torch.rand(2, 1, 24, 40)
    trained.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.weights([a, b]), trained.weights([a, b]), rtol=0, atol=0)


def test_a_unet_generator_starts_at_one_half_and_weighs_each_scene_alone() -> None:
    """--generator unet: the fixed loss's weights at first, any image size, and a scene's weights
    independent of its batch companions and of the train or eval mode (group norms)."""
    torch.manual_seed(0)
    generator = UnetLossGenerator()
    loss = tdfusion_loss(generator, alpha=0.01, weights="softmax")
    a, b = torch.rand(3, 1, 52, 70), torch.rand(3, 1, 52, 70)
    w = loss.weights([a, b])
    assert w.shape == (3, 2, 52, 70) and bool(torch.all(w == 0.5))
    for p in generator.net.segmentation_head.parameters():  # move it off the fixed loss
        torch.nn.init.normal_(p, std=0.1)
    together = loss.weights([a, b])
    assert float(together.detach().std()) > 0.01
    alone = loss.weights([a[1:2], b[1:2]])
    loss.eval()  # batch statistics would move these by far more than rounding
    assert torch.allclose(together[1:2], alone, atol=1e-4)
    assert torch.allclose(loss.weights([a, b]), together, atol=1e-4)


@pytest.mark.parametrize("generator", ["per_pixel", "unet", "per_pixel+unet", "global"])
def test_prior_weights_start_every_generator_near_them(generator: str, tmp_path: Path) -> None:
    """--prior-weights 0.95 0.05: the generator's logits plus log(prior), so a generator whose
    logits start equal (the U-Net's zero head, the global logits) starts at the prior exactly, and
    the paper's network (alone or with the U-Net) at softmax(its logits + log prior); its
    parameters get gradients through the prior."""
    a, b = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    argv = ["train", "--generator", generator, "--prior-weights", "0.95", "0.05", "--out", str(tmp_path)]
    torch.manual_seed(0)
    loss = build_loss(build_parser().parse_args(argv))
    assert isinstance(loss.generator, LogitPrior)
    w = loss.weights([a, b])
    if generator.startswith("per_pixel"):  # the U-Net's logits start at zero: the paper's network's alone
        torch.manual_seed(0)
        z = LossGenerator().logits(a, b)
        expected = torch.softmax(z + torch.tensor([0.95, 0.05]).log().view(1, 2, 1, 1), dim=1)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(w[:, 0], torch.full_like(w[:, 0], 0.95), atol=1e-6, rtol=0)
    (w[:, 0] * a.squeeze(1)).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.generator.parameters())
    with pytest.raises(ValueError, match="prior weights must be finite and positive"):
        LogitPrior(UnetLossGenerator(), (1.0, 0.0))


def test_the_paper_generator_plus_a_unet_starts_as_the_paper_generator() -> None:
    """--generator per_pixel+unet: the U-Net's logits add to the paper's, from zero."""
    a, b = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    torch.manual_seed(0)
    generator = PerPixelPlusUnetGenerator()
    loss = tdfusion_loss(generator, alpha=0.01, weights="softmax")
    torch.manual_seed(0)
    paper = LossGenerator()
    assert torch.allclose(loss.weights([a, b]), paper(a, b), atol=1e-6)
    for p in generator.unet.net.segmentation_head.parameters():
        torch.nn.init.normal_(p)
    assert not torch.allclose(loss.weights([a, b]), paper(a, b), atol=1e-3)


def test_the_paper_generator_plus_a_unet_adds_logits_where_its_softmax_saturates() -> None:
    """The weights are softmax(z + u) for the paper's logits z also where the paper's own softmax
    rounds a weight to 0 and the U-Net's logits pull the other way (the log of that softmax, even
    clamped, would cap z's gap there and give the U-Net's source all the weight)."""
    torch.manual_seed(0)
    generator = PerPixelPlusUnetGenerator()
    a, b = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        gap = generator.per_pixel.logits(a, b).diff(dim=1)  # z_b - z_a
        generator.per_pixel.out3.weight.mul_(150 / float(gap.median()))  # gaps of some 150: softmax 0 and 1
        gap = generator.per_pixel.logits(a, b).diff(dim=1)
        bias = generator.unet.net.segmentation_head[0].bias
        bias.copy_(torch.stack([gap.median(), torch.tensor(0.0)]))  # u pulls toward a by the median gap
        saturated = (generator.per_pixel(a, b) == 0).any(dim=1)
    # With a graph recorded, as the generator's call below: under no_grad the attention sums in another
    # order, which moves logits of some 150 by a few float32 steps (1.5e-5 each; 2e-5 in the weights
    # on a CPU with AVX2 only).
    expected = torch.softmax((generator.per_pixel.logits(a, b) + generator.unet(a, b)).detach().double(), dim=1)
    assert float(saturated.float().mean()) > 0.5
    assert float((saturated & (expected[:, 0] < 0.5)).float().mean()) > 0.2, "z must still win at some of them"
    weights = torch.softmax(generator(a, b), dim=1)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)
    (weights[:, 0] * torch.rand(1, 16, 16)).sum().backward()
    grad = generator.per_pixel.out3.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


@pytest.mark.parametrize("name", ["unet", "per_pixel+unet"])
def test_checkpoint_blocks_reach_the_unet_generators(name: str) -> None:
    """--checkpoint-blocks (the attribute train sets on every ReFusion, LossGenerator and
    UnetLossGenerator) checkpoints the U-Net too: its forward with a graph saves a fraction of the
    elements, and the meta-gradient stays the same."""
    torch.manual_seed(0)
    generator = UnetLossGenerator() if name == "unet" else PerPixelPlusUnetGenerator()
    head = generator if isinstance(generator, UnetLossGenerator) else generator.unet
    for p in head.net.segmentation_head.parameters():  # off the fixed loss, so that G's gradient is not trivial
        torch.nn.init.normal_(p, std=0.1)
    loss = tdfusion_loss(generator, alpha=0.01, weights="softmax")
    model, task = ReFusion(dim=8, num_blocks=1), torch.nn.Conv2d(1, 2, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    batch = {"a": a, "b": b, "target": torch.randint(0, 2, (2, 16, 16), generator=g)}

    meta = MetaStep(model, loss, task, seg_loss, inner=InnerSGD(0.5), task_inner=InnerSGD(0.5))
    parameters = {p.data_ptr() for p in generator.parameters()}

    def run(on: bool) -> tuple[int, torch.Tensor]:
        generator.checkpoint_blocks = on
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(0 if t.data_ptr() in parameters else t.numel())  # activations only
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            generator(a, b)
        result, _ = meta.hypergradient(batch, batch)
        return sum(sizes), torch.cat([grad.flatten() for grad in result.grads])

    saved_plain, plain = run(False)
    saved_checkpointed, checkpointed = run(True)
    assert saved_checkpointed < saved_plain / 5
    assert plain.norm() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))


def test_a_unet_generator_learns_in_the_meta_phase(tmp_path: Path) -> None:
    """--generator unet trains through the meta steps and is saved and named in the config."""
    main(
        ["train", "--quiet", "--generator", "unet", "--epochs", "1", "--meta-iterations", "3"]
        + ["--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48", "--out", str(tmp_path)]
    )
    state = torch.load(tmp_path / "last.pt", weights_only=True)["loss"]
    assert all(k.startswith("generator.net.") for k in state)
    head = state["generator.net.segmentation_head.0.weight"]
    assert bool(head.abs().max() > 0), "the meta steps did not move the head off the fixed loss"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["generator"] == "unet"


def test_segformer_adapts_on_the_virtual_fusion_network(tmp_path: Path) -> None:
    """--task-adaptation virtual_model differentiates SegFormer's step twice: its attention must
    take the composite kernel (the fused CPU kernels have no double backward)."""
    main(
        ["train", "--quiet", "--task-adaptation", "virtual_model", "--task-inner-lr", "0.1", "--epochs", "1"]
        + ["--meta-iterations", "2", "--synthetic-train", "4", "--crop", "32", "--task-size", "32", "48"]
        + ["--out", str(tmp_path)]
    )
    rows = (tmp_path / "logs" / "meta.csv").read_text().splitlines()
    header = rows[0].split(",")
    for row in rows[1:]:
        values = dict(zip(header, row.split(",")))
        assert values["skipped"] == "False" and float(values["hypergrad_norm"]) > 0, values


def test_yolov8_batchnorm_survives_the_virtual_step() -> None:
    """YOLOv8 has 57 BatchNorm layers: a meta step must leave every buffer of it untouched."""
    torch.manual_seed(0)
    task = build_task("yolov8", 3)
    model, loss = ReFusion(), tdfusion_loss(LossGenerator())
    batch = collate(
        [
            {
                "name": "x",
                "a": torch.rand(1, 32, 32),
                "b": torch.rand(1, 32, 32),
                "task_a": torch.rand(1, 64, 64),
                "task_b": torch.rand(1, 64, 64),
                "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]),
                "classes": torch.tensor([1]),
            }
        ]
        * 2
    )
    from metaloss import MetaStep

    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    assert sum("running_mean" in k for k in before) > 50
    meta = MetaStep(
        model,
        loss,
        task.model,
        task.loss,
        adapter=SourcesAdapter(task_keys=("task_a", "task_b")),
        inner=InnerSGD(1e-3),
        task_inner=InnerSGD(1e-3),
        outer_optimizer=torch.optim.Adam(loss.parameters(), 1e-3),
    )
    stats = meta.step(batch, batch)
    assert np.isfinite(stats.outer_loss) and stats.hypergrad_norm > 0
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())


@pytest.mark.parametrize(("task", "first", "second"), [("MFIF", "near", "far"), ("MEIF", "under", "over")])
def test_released_multi_focus_and_multi_exposure_fuse_as_released(
    shared_data: Path, tmp_path: Path, task: str, first: str, second: str
) -> None:
    """Both released pairs of each task: raw output finite in [0, 1]; the colour image carries the
    saturation-weighted blend of both sources' chroma; the task is done (multi-focus: the fused
    image is at least as sharp as each source by spatial frequency; multi-exposure: fewer clipped
    pixels, luminance at 0 or 255, than either source; measured 0.0% against 0.16-0.37% and 43-44%)."""
    from metaloss.fusion.image_io import blend_chroma
    from metaloss.fusion.metrics import sf

    cases = shared_data / "ReFusion/test_cases" / task
    out = tmp_path / task
    main(
        ["fuse", "--weights", str(shared_data / f"ReFusion/ReFusion_{task}.pth"), "--a", str(cases / first)]
        + ["--b", str(cases / second), "--out", str(out), "--raw", "--quiet"]
    )
    names = sorted(p.stem for p in (cases / first).iterdir())
    assert len(names) == 2
    for name in names:
        raw = np.load(out / f"{name}.npy")
        assert np.isfinite(raw).all() and raw.min() >= 0 and raw.max() <= 1
        src = [next((cases / d).glob(f"{name}.*")) for d in (first, second)]
        ya, yb = (read_ycrcb(p) for p in src)
        grey = cv2.imread(str(out / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(out / "rgb" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert grey is not None and rgb is not None and grey.shape == ya.shape[:2]
        blend = np.concatenate([ya[..., :1], blend_chroma(ya[..., 1:], yb[..., 1:])], axis=2)
        _assert_chroma_kept(rgb, grey, blend)
        if task == "MFIF":
            fused_sf = float(sf(torch.from_numpy(raw * 255.0)))
            for y in (ya, yb):
                assert fused_sf >= float(sf(torch.from_numpy(y[..., 0])))
        else:  # clipped: luminance that rounds to 0 or 255 (the network's output, before the stretch)

            def clipped(y: np.ndarray) -> float:
                level = np.round(y)
                return float(((level <= 0) | (level >= 255)).mean())

            assert clipped(raw * 255.0) < min(clipped(ya[..., 0]), clipped(yb[..., 0]))


def test_training_writes_fusion_safetensors_that_fuse_reads(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train` leaves the fusion network as fusion.safetensors beside last.pt and says so; resuming
    the finished run says there is nothing left; `fuse` gives the same output from either file; a
    damaged .safetensors is a command-line error naming it."""
    train = ["train", "--epochs", "1", "--meta-iterations", "1", "--model-iterations", "1", "--synthetic-train", "4"]
    train += ["--crop", "32", "--task-size", "32", "48", "--out", str(tmp_path / "run"), "--quiet"]
    main(train)
    said = capsys.readouterr().out
    assert "trained 2 steps" in said and "fusion.safetensors" in said
    main([*train, "--resume", str(tmp_path / "run" / "last.pt")])
    assert "finished run" in capsys.readouterr().out
    weights = tmp_path / "run" / "fusion.safetensors"
    assert weights.is_file() and not list((tmp_path / "run").glob(".*.tmp"))
    pair = shared_data / "ReFusion/test_cases/MIF"
    args = [
        "--a",
        str(pair / "CT_PET_SPECT/MRI_PET_14.png"),
        "--b",
        str(pair / "MRI/MRI_PET_14.png"),
        "--raw",
        "--quiet",
    ]
    main(["fuse", "--weights", str(tmp_path / "run" / "last.pt"), *args, "--out", str(tmp_path / "pt")])
    main(["fuse", "--weights", str(weights), *args, "--out", str(tmp_path / "st")])
    np.testing.assert_array_equal(np.load(tmp_path / "pt/MRI_PET_14.npy"), np.load(tmp_path / "st/MRI_PET_14.npy"))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match="damaged.safetensors"):
        main(["fuse", "--weights", str(damaged), *args, "--out", str(tmp_path / "d")])


def test_quiet_silences_ultralytics_too(tmp_path: Path) -> None:
    """`train --task-net yolov8 --quiet` prints only what it wrote: no settings banner, no model log."""
    command = [sys.executable, str(EXAMPLE / "run.py"), "train", "--task-net", "yolov8", "--epochs", "1"]
    command += ["--meta-iterations", "1", "--model-iterations", "1", "--synthetic-train", "4", "--crop", "32"]
    command += ["--task-size", "64", "64", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trained 2 steps"), lines
