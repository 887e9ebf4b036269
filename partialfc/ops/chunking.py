"""What both implementations of the fused objective share: the problem description, the
centres' inverse norms, the derivative of their normalisation and per-row target values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from partialfc.ops.targets import Targets

NORM_EPS = 1e-12  # F.normalize's floor on the norm


@dataclass(frozen=True)
class ChunkProblem:
    """What the chunk walk needs besides the tensors: the scale ``s``, the inter-class
    filter threshold (``None``: none), whether the target column is excluded from the row
    (D-Softmax) or holds the target logit (softmax), the chunk size and the matmul dtype."""

    scale: float
    threshold: float | None
    exclude_target: bool
    chunk_size: int
    compute_dtype: torch.dtype


def centre_inverse_norms(centres: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(||w_j||, eps)`` per centre, shape ``(k,)``, chunk by chunk (no ``(k, D)`` copy)."""
    out = torch.empty(centres.shape[0], dtype=dtype, device=centres.device)
    for lo in range(0, centres.shape[0], chunk_size):
        out[lo: lo + chunk_size] = torch.linalg.vector_norm(centres[lo: lo + chunk_size], dim=1, dtype=dtype)
    return out.clamp_min_(NORM_EPS).reciprocal_()


def project_out_norm(grad_dot: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. raw rows ``w (n, D)`` given ``grad_dot (n, D)``, the gradient w.r.t.
    their normalised copies ``w * inv_norm``, already multiplied by ``inv_norm``:
    ``grad_dot - (w . grad_dot) inv_norm^2 w``, the derivative of ``w / ||w||`` (in place,
    in the dtype of ``grad_dot``). Rows whose norm F.normalize floors at ``eps`` are treated as
    if it were not floored."""
    w = w.to(grad_dot.dtype)
    radial = (w * grad_dot).sum(dim=1).mul_(inv_norm.square())
    return grad_dot.sub_(radial[:, None] * w)


def per_row(targets: Targets, values: torch.Tensor, batch: int) -> torch.Tensor:
    """``values`` (aligned with ``targets.rows``) as a ``(B,)`` vector, zero where the row's
    target lives on another rank."""
    dense = values.new_zeros(batch)
    dense[targets.rows] = targets.only_local(values)
    return dense
