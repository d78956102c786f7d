"""Atomic checkpoints, loading that never runs code, and random-number-generator state.

Every file is read with ``torch.load(..., weights_only=True)``: a pickle inside a weights file
that asks for anything but tensors and plain containers (a crafted file can ask to run any
command) is refused with ``UnsafeCheckpointError``, and a file that is no PyTorch file at
all (text, random bytes, a truncated download) with a ``ValueError`` naming it. Checkpoints hold
only such types: the RNG states are stored as tensors and plain tuples.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "UnsafeCheckpointError",
    "atomic_path",
    "get_rng_state",
    "load_checkpoint",
    "load_module_state",
    "load_weights_file",
    "save_checkpoint",
    "save_safetensors",
    "set_rng_state",
]


class UnsafeCheckpointError(ValueError):
    """A weights file asks to build objects or run code that loading weights never needs.

    Examples:
        >>> import os, tempfile
        >>> class Payload:
        ...     def __reduce__(self):  # what a crafted file can do when unpickled
        ...         return (os.system, ("echo this would run",))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pth")
        >>> torch.save({"weight": Payload()}, path)
        >>> try:
        ...     load_weights_file(path)
        ... except UnsafeCheckpointError:
        ...     print("refused, never opened")
        refused, never opened
    """


def load_weights_file(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load`` a file with ``weights_only=True``, with errors that name the file.

    A ``.safetensors`` file is read with ``safetensors.torch.load_file`` (a flat dict of
    tensors).

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: the file's pickle asks for more than tensors and plain containers
            (it would run code when opened with ``weights_only=False``); it is not opened.
        ValueError: the file is no PyTorch file (text, random bytes) or is truncated.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "weights.pth"
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> sorted(load_weights_file(path))
        ['bias', 'weight']
        >>> path.write_text("not weights")
        11
        >>> load_weights_file(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../weights.pth is not a PyTorch weights file ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    if path.suffix == ".safetensors":  # a format that holds tensors only, by design
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        device = str(map_location) if map_location is not None else "cpu"
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({str(err)[:160]})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch names the global a pickle asks for (a function, a class); anything else it
        # cannot parse ("Unsupported operand ...") is simply not a pickle of weights.
        reason = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global:" in line), "")
        if reason:
            raise UnsafeCheckpointError(
                f"{path} was not loaded: it asks to build objects or run code that a weights file does not need"
                f" ({reason}). Open it with torch.load(weights_only=False) only if you "
                "trust where it came from."
            ) from None
        raise ValueError(f"{path} is not a PyTorch weights file (its contents do not unpickle: {text[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        truncated = isinstance(err, EOFError) or "central directory" in str(err) or "failed reading" in str(err)
        what = "is truncated or damaged" if truncated else "is not a PyTorch weights file"
        raise ValueError(
            f"{path} {what} ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        ) from None


def load_module_state(module: torch.nn.Module, path: str | os.PathLike[str], entry: str, name: str) -> torch.nn.Module:
    """Load ``module``'s weights from ``path``: a file of its state dict alone, or a ``MetaTrainer``
    checkpoint, whose ``entry`` (``"model"``, ``"loss"`` or ``"task_model"``) it reads. Nothing
    in the file runs (``load_weights_file``).

    Args:
        module: the network to load into (strictly: every key must fit).
        path: the file.
        entry: the checkpoint entry that holds ``module``'s state.
        name: what ``module`` is, for the errors (``"the yolov8 task network"``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: the file asks to build objects or run code (a ``ValueError``).
        ValueError: not a PyTorch file, no state dict in it, or one that does not fit ``module``
            (its first mismatches named).

    Examples:
        >>> import tempfile
        >>> path = save_checkpoint({"loss": torch.nn.Linear(2, 1).state_dict()}, Path(tempfile.mkdtemp()) / "last.pt")
        >>> load_module_state(torch.nn.Linear(2, 1), path, "loss", "the loss")
        Linear(in_features=2, out_features=1, bias=True)
        >>> load_module_state(torch.nn.Linear(3, 1), path, "loss", "the loss")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../last.pt does not fit the loss: Error(s) in loading state_dict for Linear: size mismatch ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights for {name} at {path}")
    state = load_weights_file(path)
    state = state.get(entry, state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {name}: {' '.join(str(err).split())[:300]}") from None
    return module


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary file beside ``path`` to write; it replaces ``path`` only if the block succeeds.

    A crash or an error while writing never leaves a half-written file at ``path`` (the
    temporary file is removed instead). The parent folder is created.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "run" / "weights.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = Path(tmp).write_bytes(b"complete")
        >>> target.read_bytes()
        b'complete'
        >>> try:
        ...     with atomic_path(target) as tmp:
        ...         _ = Path(tmp).write_bytes(b"half")
        ...         raise RuntimeError("crashed while writing")
        ... except RuntimeError:
        ...     pass
        >>> target.read_bytes()  # the old file is intact, no temporary file is left
        b'complete'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` with ``torch.save`` atomically (``atomic_path``), synced to disk.

    Examples:
        ``MetaTrainer`` writes its ``last.pt`` with it; any dict of tensors and plain values works:

        >>> import tempfile
        >>> path = save_checkpoint({"model": torch.nn.Linear(2, 1).state_dict(), "epoch": 3},
        ...                        Path(tempfile.mkdtemp()) / "state.pt")
        >>> load_weights_file(path)["epoch"]
        3
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a module's ``state_dict()`` as ``.safetensors`` atomically (temporary file, rename).

    The deployment format for network weights: it holds tensors only, so opening it can never
    run code (https://huggingface.co/docs/safetensors).

    Examples:
        >>> import tempfile
        >>> path = save_safetensors(torch.nn.Linear(2, 1).state_dict(), Path(tempfile.mkdtemp()) / "fusion.safetensors")
        >>> sorted(load_weights_file(path))  # opening it can never run code
        ['bias', 'weight']
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, never running code it carries.

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: the file asks for more than tensors and plain containers.
        ValueError: not a PyTorch file, truncated, or not a checkpoint of ``MetaTrainer``.

    Examples:
        >>> import tempfile
        >>> path = save_checkpoint({"model": {}}, Path(tempfile.mkdtemp()) / "last.pt")
        >>> load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../last.pt is not a MetaTrainer checkpoint (it holds keys ['model']; expected [...])

        A checkpoint written by ``MetaTrainer`` (``checkpoint_dir/last.pt``) holds the modules,
        optimisers, random states and position: ``MetaTrainer.fit(resume=path)`` reads it
        with this function.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = load_weights_file(path, map_location)
    needed = {"model", "loss", "task_model", "position", "rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        found = f"keys {sorted(state)[:8]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{path} is not a MetaTrainer checkpoint (it holds {found}; expected {sorted(needed)})")
    return state


def get_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (if present) CUDA's generators.

    Stored in types ``torch.load(weights_only=True)`` accepts: NumPy's key array as a tensor.

    Examples:
        >>> state = get_rng_state()
        >>> first = torch.rand(2)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(2), first)  # the same draws again
        True
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by ``get_rng_state``.

    Examples:
        >>> import random
        >>> state = get_rng_state()
        >>> draws = (random.random(), torch.rand(1))
        >>> set_rng_state(state)
        >>> (random.random(), torch.rand(1)) == (draws[0], draws[1])
        True
    """
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
