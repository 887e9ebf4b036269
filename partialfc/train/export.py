"""Tools over checkpoints: export the backbone alone, merge the head's shards into one matrix.

An exported backbone is a ``torch.save`` of ``{"backbone": name, "embedding_size": int,
"options": dict, "state_dict": ...}``; :func:`load_backbone` rebuilds the module from it.
"""

from __future__ import annotations

import os

import torch

from partialfc.models import build_backbone
from partialfc.train import checkpoint as ckpt


def read_backbone(path: str) -> dict:
    """The backbone record of an exported file or of a checkpoint (directory or run dir)."""
    if os.path.isfile(path):
        record = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(record, dict) or "state_dict" not in record:
            raise ckpt.CheckpointError(f"{path} is not an exported backbone (no state_dict)")
        return record
    shared = ckpt.load_shared(ckpt.resolve_checkpoint(path))
    return {**shared["model"], "state_dict": shared["backbone"]["module"]}


def export_backbone(checkpoint: str, out: str) -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` (for deployment or fine-tuning)."""
    record = read_backbone(checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(record, out)
    return record


def load_backbone(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone of an export or a checkpoint, in eval mode."""
    record = read_backbone(path)
    model = build_backbone(record["backbone"], record["embedding_size"], **record.get("options", {}))
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval()


def merge_centres(checkpoint: str, out: str | None = None) -> torch.Tensor:
    """All class centres ``(num_classes, D)`` of ``checkpoint``, assembled from the rank shards
    in global class order; written to ``out`` when given."""
    path = ckpt.resolve_checkpoint(checkpoint)
    shared = ckpt.load_shared(path)
    weight = ckpt.gather_head_rows(path, shared["head_shards"], 0, shared["num_classes"])["weight"]
    if out is not None:
        torch.save(weight, out)
    return weight
