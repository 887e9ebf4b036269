"""What a training checkpoint yields outside training: its backbone (alone, as an export
record or a module) and the head's class centres merged into one matrix.

``CKPT`` arguments are a ``step_*`` directory, a ``checkpoints`` folder or a run directory
(its latest checkpoint); a backbone may also be read from an exported file.
"""

from __future__ import annotations

import os

import torch

from partialfc.eval.export import SUFFIXES, build_exported, read_exported, write_exported
from partialfc.train import checkpoint as ckpt
from partialfc.train.state import gather_rows, read_shared


def read_backbone(path: str) -> dict:
    """The backbone record of an exported file or of a checkpoint (directory or run dir)."""
    if os.path.isfile(path):
        return read_exported(path)
    shared = read_shared(ckpt.resolve_checkpoint(path))
    return {**shared["meta"]["model"], "state_dict": shared["state"]["engine"]["module"]}


def export_backbone(checkpoint: str, out: str, suffixes: tuple[str, ...] = SUFFIXES) -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` in the format its suffix names (one of
    ``suffixes``); returns its record."""
    record = read_backbone(checkpoint)
    write_exported(record, out, suffixes)
    return record


def load_backbone(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone of an export or a checkpoint, in eval mode."""
    return build_exported(read_backbone(path), device)


def merge_centres(checkpoint: str, out: str | None = None) -> torch.Tensor:
    """All class centres ``(num_classes, D)`` of ``checkpoint``, assembled from the rank shards
    in global class order; written to ``out`` when given."""
    path = ckpt.resolve_checkpoint(checkpoint)
    shared = read_shared(path)
    weight = gather_rows(path, shared, 0, shared["meta"]["num_classes"])["head"]["weight"]
    if out is not None:
        torch.save(weight, out)
    return weight
