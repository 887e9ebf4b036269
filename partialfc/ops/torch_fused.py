"""The fused objective's chunk walk as a PyTorch loop (any device): ``(B, chunk)`` cosines
at a time, the matmuls in the problem's compute dtype, the rest in fp32 (fp64 kept)."""

from __future__ import annotations

import torch

from partialfc.ops.chunking import ChunkProblem, per_row, project_out_norm
from partialfc.ops.targets import Targets


def _put_targets(block: torch.Tensor, lo: int, targets: Targets, values) -> None:
    """``block[i, col_i - lo] = values[i]`` (``values``: ``(B,)`` or a number) for the rows
    whose target column lies in ``[lo, lo + width)``, in place; through ``gather``/``scatter``
    on the dense ``targets.col``, so no boolean mask (a host synchronisation on CUDA)."""
    local = targets.col - lo
    in_chunk = ((local >= 0) & (local < block.shape[1]))[:, None]
    index = local.clamp(0, block.shape[1] - 1)[:, None]
    values = values[:, None] if torch.is_tensor(values) else values
    block.scatter_(1, index, torch.where(in_chunk, values, block.gather(1, index)))


def _chunk_logits(emb_c, centres, inv_norm, lo, hi, targets: Targets, row_logit, p: ChunkProblem):
    """Logits ``(B, hi - lo)`` of centres ``[lo, hi)`` (fp32/fp64) with ``row_logit (B,)``
    (or ``-inf`` when excluded) in the target columns, ``-inf`` in the columns that take no
    part, and the filter's keep mask (``None`` without a threshold)."""
    w = centres[lo:hi].to(p.compute_dtype)
    cos = (emb_c @ w.T).to(inv_norm.dtype).mul_(inv_norm[lo:hi]).clamp_(-1.0, 1.0)
    keep = None
    if p.threshold is not None:
        keep = cos <= p.threshold
        cos.masked_fill_(~keep, 0.0)
    z = cos.mul_(p.scale)
    _put_targets(z, lo, targets, float("-inf") if p.exclude_target else row_logit)
    targets.drop_columns(z, lo)
    return z, keep


def row_stats(emb, centres, inv_norm, targets, target_logit, p: ChunkProblem):
    """Local online ``(row max m (B,), sum_j exp(z_j - m) (B,))`` over this rank's centres;
    with ``exclude_target`` the max starts at 0 (D-Softmax's ``1``)."""
    start = 0.0 if p.exclude_target else float("-inf")
    m = torch.full((emb.shape[0],), start, dtype=inv_norm.dtype, device=emb.device)
    s = torch.zeros_like(m)
    emb_c = emb.to(p.compute_dtype)
    row_logit = per_row(targets, target_logit, emb.shape[0])
    for lo in range(0, centres.shape[0], p.chunk_size):
        z, _ = _chunk_logits(emb_c, centres, inv_norm, lo, lo + p.chunk_size, targets, row_logit, p)
        new_m = torch.maximum(m, z.amax(dim=1))
        shift = torch.where(new_m > float("-inf"), new_m, 0.0)  # a row with no column yet: no -inf - -inf
        s = s * torch.exp(m - shift) + torch.exp(z - shift[:, None]).sum(dim=1)
        m = new_m
    return m, s


def gradients(emb, centres, inv_norm, targets, target_logit, row_max, row_weight, target_grad,
              p: ChunkProblem, need_w: bool = True):
    """``(dE (B, D), dW (k, D))`` for ``dL/dz_j = row_weight * exp(z_j - row_max)`` off the
    target and ``dL/dc_y = target_grad`` (aligned with ``targets.rows``) at it; filtered
    entries get none. ``dW`` is with respect to the raw centres, in their dtype (``None``,
    not computed, unless ``need_w``)."""
    grad_e = torch.zeros(emb.shape, dtype=inv_norm.dtype, device=emb.device)
    grad_w = torch.empty_like(centres) if need_w else None
    emb_c = emb.to(p.compute_dtype)
    row_logit = per_row(targets, target_logit, emb.shape[0])
    row_target_grad = per_row(targets, target_grad, emb.shape[0])
    for lo in range(0, centres.shape[0], p.chunk_size):
        hi = min(lo + p.chunk_size, centres.shape[0])
        z, keep = _chunk_logits(emb_c, centres, inv_norm, lo, hi, targets, row_logit, p)
        g = z.sub_(row_max[:, None]).exp_().mul_((row_weight * p.scale)[:, None])
        if keep is not None:
            g.mul_(keep)
        _put_targets(g, lo, targets, row_target_grad)
        g.mul_(inv_norm[lo:hi])  # d/d(E . w_j) = inv_norm_j * dL/dc_j
        g = g.to(p.compute_dtype)
        w = centres[lo:hi]
        grad_e += (g @ w.to(p.compute_dtype)).to(grad_e.dtype)
        if need_w:
            grad_w[lo:hi] = project_out_norm((g.T @ emb_c).to(inv_norm.dtype), w, inv_norm[lo:hi])
    return grad_e.to(emb.dtype), grad_w
