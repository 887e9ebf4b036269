"""The head's inputs: each rank's validation status, the one error every rank raises alike, and
the labels carried as extra columns of the embeddings' gather.

A rank's status is a ``(STATUS_WIDTH,)`` int64 vector (shapes, dtypes, label range,
finiteness) built without leaving the device; every rank's statuses are gathered and the same
:func:`input_error` is computed from them on every rank, so no rank raises while another
waits in a collective."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATUS_WIDTH = 12  # emb dims, rows, width, emb float, labels int, label dims, label rows, dtype, grad, lo, hi, finite


def labels_are_int(labels: torch.Tensor) -> bool:
    return not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool


def _paired(embeddings: torch.Tensor, labels: torch.Tensor) -> bool:
    """Float ``(b, any)`` embeddings with int ``(b,)`` labels (known on the host)."""
    return (embeddings.dim() == 2 and embeddings.is_floating_point() and labels_are_int(labels)
            and labels.dim() == 1 and labels.shape[0] == embeddings.shape[0])


def well_formed(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: int) -> bool:
    """Whether this rank's input has the shapes and kinds the head takes (known on the host)."""
    return _paired(embeddings, labels) and embeddings.shape[1] == embedding_size


def local_status(embeddings: torch.Tensor, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """This rank's status ``(STATUS_WIDTH,)`` int64 on ``device``, without a host
    synchronisation (the value fields are zeros where the shapes are wrong or the batch is
    empty; those are reported from the shape fields first)."""
    dims = embeddings.dim(), labels.dim()
    shape = torch.tensor([dims[0], embeddings.shape[0] if dims[0] else 0, embeddings.shape[-1] if dims[0] else 0,
                          int(embeddings.is_floating_point()), int(labels_are_int(labels)), dims[1],
                          labels.shape[0] if dims[1] else 0,
                          FLOAT_DTYPES.index(embeddings.dtype) if embeddings.dtype in FLOAT_DTYPES else -1,
                          int(embeddings.requires_grad)], dtype=torch.int64)
    if _paired(embeddings, labels) and labels.shape[0] > 0:
        values = torch.stack([v.to(device=device, dtype=torch.int64) for v in
                              (labels.min(), labels.max(), torch.isfinite(embeddings).all())])
    else:
        values = torch.zeros(3, dtype=torch.int64, device=device)
    # A pageable host->device copy with non_blocking=True is safe (CUDA stages the source
    # before returning) and does not synchronise.
    return torch.cat([shape.to(device, non_blocking=True), values])


def input_error(statuses: Sequence[Sequence[int]], embedding_size: int, num_classes: int,
                max_batch: int | None = None, nonfinite_raises: bool = True) -> str | None:
    """The message of the first thing wrong with the ranks' inputs (``statuses``: one status
    per rank, in rank order, as host integers), or None."""
    dtypes = {s[7] for s in statuses}
    if len(dtypes) > 1:
        return "embeddings have different dtypes on different ranks: " + ", ".join(
            f"rank {r}: {FLOAT_DTYPES[s[7]] if s[7] >= 0 else 'not float'}" for r, s in enumerate(statuses))
    for r, (emb_dim, b, width, emb_float, lab_int, lab_dim, lab_n) in enumerate(s[:7] for s in statuses):
        where = f" on rank {r}" if len(statuses) > 1 else ""
        if emb_dim != 2 or width != embedding_size:
            return f"embeddings{where} must have shape (batch, {embedding_size}), got {emb_dim} dims of width {width}"
        if not emb_float:
            return f"embeddings{where} must be floating point"
        if not lab_int:
            return (f"labels{where} must be an integer tensor (e.g. torch.int64), "
                    "got a floating-point, complex or bool tensor")
        if lab_dim != 1 or lab_n != b:
            return f"labels{where} must have shape ({b},) to match the embeddings, got {lab_dim} dims of length {lab_n}"
        if max_batch is not None and b > max_batch:
            return f"embeddings{where} hold {b} rows, over the head's max_batch={max_batch}"
    filled = [s for s in statuses if s[1]]
    if not filled:
        return "the global batch is empty"
    lo, hi = min(s[9] for s in filled), max(s[10] for s in filled)
    if lo < 0 or hi >= num_classes:
        return f"label {lo if lo < 0 else hi} outside [0, {num_classes}) (num_classes={num_classes})"
    if nonfinite_raises and not all(s[11] for s in filled):
        return "embeddings contain NaN or inf"
    return None


def all_finite(statuses: Sequence[Sequence[int]]) -> bool:
    return all(s[11] for s in statuses if s[1])


def labels_as_columns(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 ``labels (b,)`` as ``(b, 8 / itemsize)`` columns of ``dtype``, bit for bit, so that
    they travel in the embeddings' gather (:func:`columns_as_labels` undoes it)."""
    return labels.to(torch.int64).contiguous().view(dtype).reshape(labels.shape[0], -1)


def columns_as_labels(columns: torch.Tensor) -> torch.Tensor:
    """The int64 labels ``(n,)`` of :func:`labels_as_columns`' columns ``(n, 8 / itemsize)``."""
    # a copy of its own: a slice of one row is "contiguous" at an offset int64 cannot view
    return columns.detach().clone(memory_format=torch.contiguous_format).view(torch.int64).reshape(-1)
