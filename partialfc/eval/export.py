"""Exported backbones: the file formats and the module they rebuild.

A backbone record is ``{"backbone": name, "embedding_size": int, "options": dict,
"state_dict": ...}``. The output suffix picks the file: ``.pt``/``.pth`` a ``torch.save`` of the
record, ``.safetensors`` the state dict with the rest as string metadata (``options`` as JSON).
Taking one out of a training checkpoint is :mod:`partialfc.train.artifacts`' job (``train``
imports ``eval``, never the reverse); ONNX is :mod:`partialfc.eval.onnx`'s.
"""

from __future__ import annotations

import json
import os

import safetensors.torch
import torch

from partialfc.errors import CheckpointError, ExportError
from partialfc.models import build_backbone
from partialfc.torch_files import load_plain

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)  # what write_exported can write


def read_exported(path: str) -> dict:
    """The backbone record of an exported file (``.safetensors`` or a ``torch.save``)."""
    if path.endswith(SAFETENSORS_SUFFIX):
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "backbone" not in meta:
            raise CheckpointError(f"{path} is not an exported backbone (no backbone in its metadata)")
        return {"backbone": meta["backbone"], "embedding_size": int(meta["embedding_size"]),
                "options": json.loads(meta.get("options", "{}")), "state_dict": safetensors.torch.load_file(path)}
    record = load_plain(path, "exported backbone")
    if not isinstance(record, dict) or "state_dict" not in record:
        raise CheckpointError(f"{path} is not an exported backbone (no state_dict)")
    return record


def write_exported(record: dict, out: str, suffixes: tuple[str, ...] = SUFFIXES) -> None:
    """Write a backbone record to ``out`` in the format its suffix names; a suffix outside
    ``suffixes`` raises :class:`ExportError` before anything is written."""
    if not out.endswith(suffixes):
        hint = " (ONNX: partialfc export onnx)" if out.endswith(".onnx") else ""
        raise ExportError(f"cannot write {out}: the output must end in {', '.join(suffixes)}{hint}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(SAFETENSORS_SUFFIX):
        meta = {"backbone": record["backbone"], "embedding_size": str(record["embedding_size"]),
                "options": json.dumps(record.get("options", {}))}
        safetensors.torch.save_file({k: v.contiguous() for k, v in record["state_dict"].items()}, out, meta)
    else:
        torch.save(record, out)


def build_exported(record: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The module a backbone record describes, with its weights, in eval mode."""
    model = build_backbone(record["backbone"], record["embedding_size"], **record.get("options", {}))
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval()
