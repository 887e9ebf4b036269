"""The margin-softmax objectives fused with the cosine matmul, chunked over the class centres.

:func:`fused_margin_softmax` computes the same per-row losses as a loss's plain path (the
clamped cosines ``normalize(x) @ normalize(W).T``, the loss's target logit, then
:class:`~partialfc.ops.objectives.RowObjective`) from the normalised embeddings ``E (B, D)``
and the raw centres ``W (k, D)``, without ever holding the ``(B, k)`` logits:

- forward walks ``W`` in chunks of ``chunk_size`` rows, computing each chunk's cosines,
  logits and an online (running max, running sum of exp) per row; then the same two
  collectives as the plain objectives (global MAX of the row maxima, one SUM of (sum of
  exp, target logit));
- backward recomputes each chunk and writes ``dE (B, D)`` and ``dW (k, D)`` (the gradient
  with respect to the *raw* centres: their normalisation is differentiated inside, so no
  normalised copy of ``W`` exists) directly. Peak memory ``O(B * chunk + k * D)``.

The target cosines ``c_y`` (``n`` dot products) are computed up front; the loss's
``target_logit`` and its per-element slope ``dt/dc`` (autograd on a detached leaf, so
``psi`` and both gradient modes work unchanged) enter the kernel, whose backward puts
``dL/dt * dt/dc`` into the target column. ``target_logit`` must act elementwise and have no
parameters of its own.

Two implementations of the chunk walk share everything else: ``"torch"`` (a PyTorch loop,
any device) and ``"triton"`` (:mod:`partialfc.ops.triton_fused`, CUDA, or CPU tensors under
``TRITON_INTERPRET=1``). Matmuls run in the autocast dtype when autocast is on at the call
(or in the inputs' dtype), everything after them in fp32 (fp64 stays fp64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partialfc.ops.collectives import all_reduce
from partialfc.ops.objectives import RowObjective
from partialfc.ops.targets import Targets

IMPLEMENTATIONS = ("torch", "triton")
DEFAULT_CHUNK = 8192  # centres per chunk: B x 8192 fp32 logits (16 MB at B = 512)
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


def _torch_chunk_logits(emb_c, centres, inv_norm, lo, hi, targets: Targets, target_logit, p: ChunkProblem):
    """Logits ``(B, hi - lo)`` of centres ``[lo, hi)`` (fp32/fp64), the filter's keep mask
    (``None`` without a threshold) and the local target entries ``(rows, cols - lo, selector)``."""
    w = centres[lo:hi].to(p.compute_dtype)
    cos = (emb_c @ w.T).to(inv_norm.dtype).mul_(inv_norm[lo:hi]).clamp_(-1.0, 1.0)
    keep = None
    if p.threshold is not None:
        keep = cos <= p.threshold
        cos.masked_fill_(~keep, 0.0)
    z = cos.mul_(p.scale)
    sel = (targets.cols >= lo) & (targets.cols < hi)
    rows, cols = targets.rows[sel], targets.cols[sel] - lo
    z[rows, cols] = float("-inf") if p.exclude_target else target_logit[sel]
    return z, keep, (rows, cols, sel)


def torch_row_stats(emb, centres, inv_norm, targets, target_logit, p: ChunkProblem):
    """Local online ``(row max m (B,), sum_j exp(z_j - m) (B,))`` over this rank's centres;
    with ``exclude_target`` the max starts at 0 (D-Softmax's ``1``)."""
    start = 0.0 if p.exclude_target else float("-inf")
    m = torch.full((emb.shape[0],), start, dtype=inv_norm.dtype, device=emb.device)
    s = torch.zeros_like(m)
    emb_c = emb.to(p.compute_dtype)
    for lo in range(0, centres.shape[0], p.chunk_size):
        z, _, _ = _torch_chunk_logits(emb_c, centres, inv_norm, lo, lo + p.chunk_size, targets, target_logit, p)
        new_m = torch.maximum(m, z.amax(dim=1))
        s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(dim=1)
        m = new_m
    return m, s


def torch_gradients(emb, centres, inv_norm, targets, target_logit, row_max, row_weight, target_grad,
                    p: ChunkProblem):
    """``(dE (B, D), dW (k, D))`` for ``dL/dz_j = row_weight * exp(z_j - row_max)`` off the
    target and ``dL/dc_y = target_grad`` (aligned with ``targets.rows``) at it; filtered
    entries get none. ``dW`` is with respect to the raw centres, in their dtype."""
    grad_e = torch.zeros(emb.shape, dtype=inv_norm.dtype, device=emb.device)
    grad_w = torch.empty_like(centres)
    emb_c = emb.to(p.compute_dtype)
    for lo in range(0, centres.shape[0], p.chunk_size):
        hi = min(lo + p.chunk_size, centres.shape[0])
        z, keep, (rows, cols, sel) = _torch_chunk_logits(emb_c, centres, inv_norm, lo, hi, targets,
                                                         target_logit, p)
        g = z.sub_(row_max[:, None]).exp_().mul_((row_weight * p.scale)[:, None])
        if keep is not None:
            g.mul_(keep)
        g[rows, cols] = target_grad[sel]
        g.mul_(inv_norm[lo:hi])  # d/d(E . w_j) = inv_norm_j * dL/dc_j
        g = g.to(p.compute_dtype)
        w = centres[lo:hi]
        grad_e += (g @ w.to(p.compute_dtype)).to(grad_e.dtype)
        grad_w[lo:hi] = project_out_norm((g.T @ emb_c).to(inv_norm.dtype), w, inv_norm[lo:hi])
    return grad_e.to(emb.dtype), grad_w


def project_out_norm(grad_dot: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. raw rows ``w (n, D)`` given ``grad_dot (n, D)``, the gradient w.r.t.
    their normalised copies ``w * inv_norm``, already multiplied by ``inv_norm``:
    ``grad_dot - (w . grad_dot) inv_norm^2 w``, the derivative of ``w / ||w||`` (in place,
    in the dtype of ``grad_dot``). Rows whose norm F.normalize floors at ``eps`` are treated as
    if it were not floored."""
    w = w.to(grad_dot.dtype)
    radial = (w * grad_dot).sum(dim=1).mul_(inv_norm.square())
    return grad_dot.sub_(radial[:, None] * w)


def _backend(implementation: str):
    if implementation == "triton":
        from partialfc.ops import triton_fused  # optional dependency, imported on use

        return triton_fused.row_stats, triton_fused.gradients
    return torch_row_stats, torch_gradients


class _FusedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, centres, inv_norm, target_logit, target_slope, targets: Targets,
                objective: RowObjective, problem: ChunkProblem, group, implementation: str):
        row_stats, _ = _backend(implementation)
        m, s = row_stats(emb, centres, inv_norm, targets, target_logit, problem)
        row_max = all_reduce(m.clone(), dist.ReduceOp.MAX, group)
        stats = torch.zeros((2, emb.shape[0]), dtype=m.dtype, device=m.device)
        stats[0] = s * torch.exp(m - row_max)
        stats[1, targets.rows] = target_logit
        sum_exp, target = all_reduce(stats, dist.ReduceOp.SUM, group)
        rows = targets.rows
        if objective.dissected:  # softplus(t_intra - z_y) + log(1 + r * sum_{j != y} exp(z_j))
            denom = torch.exp(-row_max) + objective.inter_scale * sum_exp
            intra_gap = objective.intra_logit - target
            loss = F.softplus(intra_gap) + row_max + torch.log(denom)
            weight, target_pull = objective.inter_scale / denom, -torch.sigmoid(intra_gap[rows])
        else:  # LSE_j(z_j) - z_y
            loss = torch.log(sum_exp) + row_max - target
            weight = sum_exp.reciprocal()
            target_pull = torch.exp(target[rows] - row_max[rows]) * weight[rows] - 1.0
        ctx.save_for_backward(emb, centres, inv_norm, row_max, weight, target_pull, target_logit, target_slope)
        ctx.targets, ctx.problem, ctx.implementation = targets, problem, implementation
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        emb, centres, inv_norm, row_max, weight, target_pull, target_logit, target_slope = ctx.saved_tensors
        targets = ctx.targets
        _, gradients = _backend(ctx.implementation)
        grad_rows = grad_rows.to(weight.dtype)
        target_grad = target_pull * grad_rows[targets.rows] * target_slope
        grad_e, grad_w = gradients(emb, centres, inv_norm, targets, target_logit, row_max, weight * grad_rows,
                                   target_grad, ctx.problem)
        return grad_e, grad_w, None, None, None, None, None, None, None, None


def fused_margin_softmax(embeddings: torch.Tensor, centres: torch.Tensor, targets: Targets, group=None, *,
                         target_logit: Callable[[torch.Tensor], torch.Tensor],
                         objective: RowObjective = RowObjective(), scale: float = 1.0,
                         inter_threshold: float | None = None, implementation: str = "torch",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Per-row losses ``(B,)`` of ``objective`` over ``z_j = scale * c_j`` (``c = clamp(E @
    normalize(W).T, -1, 1)``, non-target ``c_j > inter_threshold`` set to 0) with
    ``target_logit(c_y)`` (``(n,) -> (n,)``, aligned with ``targets.rows``) at the targets.

    ``embeddings (B, D)``: already normalised (their normalisation stays in autograd);
    ``centres (k, D)``: raw, this rank's columns (``k`` may be 0). Identical on every rank of
    ``group``; gradients flow to both inputs."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"fused implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    device_type = embeddings.device.type
    compute = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
               else torch.promote_types(embeddings.dtype, centres.dtype))
    accumulate = torch.promote_types(torch.promote_types(embeddings.dtype, centres.dtype), torch.float32)
    problem = ChunkProblem(float(scale), inter_threshold, objective.dissected, int(chunk_size or DEFAULT_CHUNK),
                           compute)
    rows, cols = targets.rows, targets.cols
    with torch.no_grad():
        inv_norm = centre_inverse_norms(centres, problem.chunk_size, accumulate)
        cos_y = (embeddings[rows].to(accumulate) * centres[cols].to(accumulate)).sum(dim=1)
        cos_y = cos_y.mul_(inv_norm[cols]).clamp_(-1.0, 1.0)
    with torch.autocast(device_type, enabled=False):
        with torch.enable_grad():  # psi's slope by autograd on a detached leaf: both gradient modes
            cos_y.requires_grad_(True)
            logit = target_logit(cos_y)
            slope, = torch.autograd.grad(logit.sum(), cos_y)
        return _FusedRows.apply(embeddings, centres, inv_norm, logit.detach(), slope, targets, objective,
                                problem, group, implementation)
