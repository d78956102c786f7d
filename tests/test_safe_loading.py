"""Opening a weights file never runs code, and every unreadable file is an error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tdfusion.cli import main
from tdfusion.tasks import build_task

from metaloss import UnsafeCheckpointError, load_checkpoint
from metaloss.checkpoint import get_rng_state, save_checkpoint, set_rng_state
from metaloss.fusion import ReFusion, load_released_weights
from tests.toy import SmallFusion

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tdfusion"


class _Payload:
    """Unpickling this runs a shell command (what a crafted weights file can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    return path, marker


def _entry_points(path: Path, tmp_path: Path) -> dict[str, object]:
    pair = str(tmp_path / "missing.png")
    return {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_released_weights": lambda: load_released_weights(ReFusion(), path),
        "task weights": lambda: build_task("segformer", 4, weights=path),
        "fuse --weights": lambda: main(
            ["fuse", "--weights", str(path), "--a", pair, "--b", pair, "--out", str(tmp_path / "f"), "--quiet"]
        ),
        "train --resume": lambda: main(
            [
                "train",
                "--quiet",
                "--resume",
                str(path),
                "--epochs",
                "1",
                "--meta-iterations",
                "1",
                "--synthetic-train",
                "4",
            ]
            + ["--crop", "32", "--task-size", "32", "48", "--out", str(tmp_path / "t")]
        ),
    }


@pytest.mark.parametrize(
    "entry", ["load_checkpoint", "load_released_weights", "task weights", "fuse --weights", "train --resume"]
)
def test_a_crafted_file_is_refused_and_its_code_never_runs(
    crafted: tuple[Path, Path], tmp_path: Path, entry: str
) -> None:
    path, marker = crafted
    with pytest.raises((UnsafeCheckpointError, SystemExit)) as info:
        _entry_points(path, tmp_path)[entry]()  # type: ignore[operator]
    assert str(path) in str(info.value) and "run code" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["text", "random bytes", "truncated", "another network"])
def test_unreadable_files_are_named_with_what_they_hold(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "last.pt"
    if kind == "text":
        path.write_text("not weights\n")
    elif kind == "random bytes":
        path.write_bytes(
            torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            .numpy()
            .tobytes()
        )
    elif kind == "truncated":
        save_checkpoint({"model": ReFusion().state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save(SmallFusion().state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_released_weights(ReFusion(), path)
    message = str(info.value)
    assert str(path) in message and len(message) < 600
    expected = {
        "text": "not a PyTorch",
        "random bytes": "not a PyTorch",
        "truncated": "truncated",
        "another network": "does not fit",
    }
    assert expected[kind] in message
    with pytest.raises(ValueError, match="last.pt"):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = get_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # the plain, safe torch.load accepts it
    set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
