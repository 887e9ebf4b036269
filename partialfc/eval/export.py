"""Exported backbones: the file format and the module it rebuilds.

An exported backbone is a ``torch.save`` of ``{"backbone": name, "embedding_size": int,
"options": dict, "state_dict": ...}``. Taking one out of a training checkpoint is
:mod:`partialfc.train.artifacts`' job (``train`` imports ``eval``, never the reverse).
"""

from __future__ import annotations

import os

import torch

from partialfc.errors import CheckpointError
from partialfc.models import build_backbone


def read_exported(path: str) -> dict:
    """The backbone record of an exported file."""
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or "state_dict" not in record:
        raise CheckpointError(f"{path} is not an exported backbone (no state_dict)")
    return record


def write_exported(record: dict, out: str) -> None:
    """Write a backbone record to ``out`` (for deployment or fine-tuning)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(record, out)


def build_exported(record: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The module a backbone record describes, with its weights, in eval mode."""
    model = build_backbone(record["backbone"], record["embedding_size"], **record.get("options", {}))
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval()
