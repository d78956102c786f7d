"""A fusion network as an ONNX file, and that file run by onnxruntime as a fusion network.

``export_onnx`` writes a ``(B, 2, H, W) -> (B, 1, H, W)`` fusion network with dynamic batch,
height and width through PyTorch's exporter (``torch.onnx.export(dynamo=True)``, which needs the
``onnx`` and ``onnxscript`` packages); ``OnnxFusion`` runs such a file with onnxruntime and
is called like the torch network. Install them with ``pip install "metaloss[deploy]"``.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from metaloss.checkpoint import atomic_path

__all__ = ["OnnxFusion", "export_onnx"]


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, example_size: tuple[int, int] = (64, 80)) -> Path:
    """Write ``model`` as ONNX with dynamic batch, height and width (atomically: no partial file).

    Args:
        model: a fusion network taking ``(B, 2, H, W)`` and returning ``(B, 1, H, W)``.
        path: the ``.onnx`` file to write.
        example_size: the ``(H, W)`` of the example input traced (any size works afterwards).

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> import onnx
        >>> path = export_onnx(torch.nn.Conv2d(2, 1, 3, padding=1).eval(), Path(tempfile.mkdtemp()) / "fusion.onnx")
        >>> shape = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
        >>> [d.dim_param or d.dim_value for d in shape]  # batch, height and width stay free
        ['batch', 2, 'height', 'width']
    """
    device = next(model.parameters()).device
    example = torch.rand(1, 2, *example_size, device=device)
    dims = (  # by position, so that the forward's argument may have any name
        {
            0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=8, max=16384),
            3: torch.export.Dim("width", min=8, max=16384),
        },
    )
    was_training = model.training
    try:
        model.eval()
        with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress
            torch.onnx.export(
                model,
                (example,),
                tmp,
                dynamo=True,
                dynamic_shapes=dims,
                input_names=["sources"],
                output_names=["fused"],
                external_data=False,
            )
    finally:
        model.train(was_training)
    return Path(path)


class OnnxFusion:
    """An exported fusion network run by onnxruntime, called like the torch one.

    Args:
        path: an ``.onnx`` file written by ``export_onnx``.
        threads: onnxruntime's intra-op threads (``None``: its default).

    Examples:
        >>> import tempfile
        >>> net = torch.nn.Conv2d(2, 1, 3, padding=1)  # any fusion network; ReFusion in the example
        >>> path = export_onnx(net.eval(), Path(tempfile.mkdtemp()) / "fusion.onnx")
        >>> fusion = OnnxFusion(path, threads=1)
        >>> x = torch.rand(1, 2, 48, 80)  # any height and width
        >>> fusion(x).shape, bool(torch.allclose(fusion(x), net(x), atol=1e-5))
        (torch.Size([1, 1, 48, 80]), True)
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{path} is not a readable ONNX model: {str(err).splitlines()[0][:200]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        """Fuse ``(B, 2, H, W)`` sources in [0, 1] to ``(B, 1, H, W)`` (float32, on the CPU)."""
        inputs = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: inputs})[0])

    def eval(self) -> OnnxFusion:
        """For symmetry with ``nn.Module`` (an exported network is always in inference mode)."""
        return self
