"""ONNX out and in: a backbone exported with a dynamic batch (input ``images (N, 3, 112, 112)``
float32, output ``embeddings (N, D)``), checked with onnxruntime against PyTorch, and an
exported model run by onnxruntime wherever a backbone module is expected.

Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime
import torch

from partialfc.errors import ExportError

OPSET = 18  # ONNX opset of exported models
TOLERANCE = 1e-4  # largest accepted max |onnxruntime - torch| / max |torch|


def export_onnx(model: torch.nn.Module, out: str, opset: int = OPSET) -> None:
    """Write ``model`` (put in eval mode, on CPU) to ``out`` with a dynamic batch dimension."""
    if not out.endswith(".onnx"):
        raise ExportError(f"cannot write {out}: an ONNX export must end in .onnx")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    model = model.cpu().eval()
    example = torch.zeros(2, 3, 112, 112)
    torch.onnx.export(model, (example,), out, dynamo=True, opset_version=opset, input_names=["images"],
                      output_names=["embeddings"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False, verbose=False)


class OnnxBackbone(torch.nn.Module):
    """An exported ``.onnx`` model run by onnxruntime (CPU) as a backbone: ``images (N, 3,
    112, 112)`` -> float32 ``embeddings (N, D)`` on the images' device. Not trainable."""

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isfile(path):
            raise ExportError(f"no ONNX model at {path}")
        self.path = path
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0]).to(images.device)


def onnx_difference(model: torch.nn.Module, path: str, batch_sizes=(1, 8), seed: int = 0) -> dict[int, float]:
    """``{batch: max |onnxruntime - torch| / max |torch|}`` on random images, ``model`` in eval
    mode on CPU."""
    model = model.cpu().eval()
    runtime = OnnxBackbone(path)
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 112, 112, generator=g)
            ref = model(x).numpy()
            out[batch] = float(np.abs(runtime(x).numpy() - ref).max() / max(np.abs(ref).max(), 1e-12))
    return out


def export_checked(model: torch.nn.Module, out: str, opset: int = OPSET) -> dict[int, float]:
    """:func:`export_onnx` then :func:`onnx_difference`; raises :class:`ExportError` (the file
    stays for inspection) when onnxruntime disagrees with PyTorch beyond ``TOLERANCE``."""
    export_onnx(model, out, opset)
    difference = onnx_difference(model, out)
    if max(difference.values()) > TOLERANCE:
        raise ExportError(f"{out}: onnxruntime differs from PyTorch by {max(difference.values()):.2e} "
                          f"(relative, tolerance {TOLERANCE:g})")
    return difference
