"""Every bad command-line value is an argparse error (exit 2, no traceback) that names the flag,
raised before any work is done or any file is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tdfusion.cli import main

BAD_VALUES = [
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--epochs", "two"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["demo", "--crop", "0"], "--crop"),
    (["demo", "--task-size", "0", "0"], "--task-size"),
    (["demo", "--lr", "-1e-3"], "--lr"),
    (["demo", "--alpha", "nan"], "--alpha"),
    (["demo", "--inner-steps", "0"], "--inner-steps"),
    (["demo", "--meta-accumulation", "0"], "--meta-accumulation"),
    (["demo", "--workers", "-1"], "--workers"),
    (["demo", "--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
    (["demo", "--epochs", "3", "--warmup-epochs", "1", "--frozen-loss-epochs", "3"], "--frozen-loss-epochs"),
    (["downstream", "--dataset", "msrs", "--root", "x", "--epochs", "0"], "--epochs"),
    (["demo", "--device", "gpu"], "--device"),
    (["train", "--dataset", "folders"], "--dataset"),
    (["fuse", "--weights", "w.onnx", "--a", "a", "--b", "b", "--backend", "onnxruntime", "--bf16"], "--bf16"),
    (["train", "--fixed-weights", "1", "0"], "--fixed-weights"),  # without --ablation I
    (["train", "--ablation", "I", "--fixed-weights", "0.7", "0.7"], "--fixed-weights"),  # not summing to 1
    (["train", "--ablation", "I", "--fixed-weights", "-1", "2"], "--fixed-weights"),
    (["train", "--ablation", "I", "--prior-weights", "0.9", "0.1"], "--prior-weights"),  # a fixed loss
    (["train", "--prior-weights", "0.9", "0.2"], "--prior-weights"),
    (["train", "--prior-weights", "1", "0"], "--prior-weights"),  # log(0)
]


@pytest.mark.parametrize("argv, flag", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_value_is_an_error_naming_the_flag_before_any_file_is_written(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not out.exists(), "a file was written before the arguments were checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    for argv in (["demo"], ["fuse", "--a", "x", "--b", "y"], ["train"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(target)])
        assert exit_info.value.code == 2
        assert "--out" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_a_learned_loss_that_does_not_fit_is_an_error_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--loss-from: a missing file, a fixed loss, another generator's state and a file that would
    run code are each an argparse error naming --loss-from (and the file), before any file is
    written."""
    global_loss = tmp_path / "global.pt"
    torch.save({"loss": {"generator.logits": torch.zeros(2)}}, global_loss)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"loss": Path("x")}, unsafe)  # a pickled object: weights_only refuses it
    cases = [
        (["train", "--loss-from", str(tmp_path / "missing.pt")], "missing.pt"),
        (["train", "--ablation", "I", "--loss-from", str(global_loss)], "fixed loss"),
        (["train", "--loss-from", str(global_loss)], "global.pt"),  # the per-pixel generator
        (["demo", "--loss-from", str(unsafe)], "unsafe.pt"),
    ]
    for argv, detail in cases:
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--loss-from" in err and detail in err and "Traceback" not in err, err
        assert not out.exists(), "a file was written before the arguments were checked"
