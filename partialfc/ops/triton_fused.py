"""The fused objective's chunk walk as Triton kernels (CUDA; CPU tensors under
``TRITON_INTERPRET=1``, set before Triton is first imported).

Same interface as :mod:`partialfc.ops.torch_fused`. Forward: one program per (block of
rows, split of the columns) computes the cosines tile by tile (``tl.dot`` over ``D``) and
keeps an online (max, sum of exp) per row; the splits are combined on the host (``(B,
splits)`` numbers). Backward: one program per (block of rows, tile of columns) recomputes
its cosines and adds its share of ``dE`` and of ``dW`` (before the normalisation's
derivative, applied afterwards chunk by chunk) with atomic adds, so the order of the sums,
hence the last bits, may vary from run to run on a GPU. Neither pass holds ``(B, k)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from partialfc.ops.chunking import ChunkProblem, per_row, project_out_norm
from partialfc.ops.targets import Targets

_NEG_INF = tl.constexpr(float("-inf"))


def _blocks(emb: torch.Tensor) -> tuple[int, int, int]:
    """(rows, columns, depth) per tile: the smallest tl.dot accepts in the interpreter and
    for fp64, larger on a GPU."""
    if emb.device.type != "cuda" or emb.dtype == torch.float64:
        return 16, 16, 16
    return 64, 64, 64


@triton.jit
def _cosine_tile(E, W, INV, rows, cols, row_ok, col_ok, D, stride_e, stride_w,
                 IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Clamped cosines (BLOCK_B, BLOCK_K) in INV's dtype."""
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=INV.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        e = tl.load(E + rows[:, None] * stride_e + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(e, tl.trans(w.to(e.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(e, tl.trans(w.to(e.dtype)), acc)
    inv = tl.load(INV + cols, mask=col_ok, other=1.0)
    return tl.minimum(tl.maximum(acc * inv[None, :], -1.0), 1.0)


@triton.jit
def _logits(cos, cols, tcol, tlogit, scale, threshold, HAS_THRESHOLD: tl.constexpr,
            EXCLUDE_TARGET: tl.constexpr):
    """``scale * cos`` (filtered) with the target logit (or -inf) in the target column."""
    if HAS_THRESHOLD:
        cos = tl.where(cos > threshold, 0.0, cos)
    is_target = cols[None, :] == tcol[:, None]
    if EXCLUDE_TARGET:
        return tl.where(is_target, _NEG_INF, cos * scale)
    return tl.where(is_target, tlogit[:, None], cos * scale)


@triton.jit
def _row_stats_kernel(E, W, INV, TCOL, TLOGIT, M_OUT, S_OUT, B, K, D, cols_per_split, stride_e, stride_w,
                      scale, threshold, HAS_THRESHOLD: tl.constexpr, EXCLUDE_TARGET: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tcol = tl.load(TCOL + rows, mask=row_ok, other=-1)
    tlogit = tl.load(TLOGIT + rows, mask=row_ok, other=0.0)
    if EXCLUDE_TARGET:
        m = tl.zeros((BLOCK_B,), dtype=INV.dtype.element_ty)
    else:
        m = tl.full((BLOCK_B,), _NEG_INF, dtype=INV.dtype.element_ty)
    s = tl.zeros((BLOCK_B,), dtype=INV.dtype.element_ty)
    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, K)
    for c0 in range(lo, hi, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_ok = cols < hi
        cos = _cosine_tile(E, W, INV, rows, cols, row_ok, col_ok, D, stride_e, stride_w, IEEE, BLOCK_B, BLOCK_K,
                           BLOCK_D)
        z = _logits(cos, cols, tcol, tlogit, scale, threshold, HAS_THRESHOLD, EXCLUDE_TARGET)
        z = tl.where(col_ok[None, :], z, _NEG_INF)
        new_m = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(new_m == _NEG_INF, 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = new_m
    nsplit = tl.num_programs(1)
    tl.store(M_OUT + rows * nsplit + pid_s, m, mask=row_ok)
    tl.store(S_OUT + rows * nsplit + pid_s, s, mask=row_ok)


@triton.jit
def _gradients_kernel(E, W, INV, TCOL, TLOGIT, ROW_MAX, ROW_WEIGHT, TGRAD, GE, GW, B, K, D, stride_e, stride_w,
                      scale, threshold, HAS_THRESHOLD: tl.constexpr, EXCLUDE_TARGET: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < B, cols < K
    tcol = tl.load(TCOL + rows, mask=row_ok, other=-1)
    tlogit = tl.load(TLOGIT + rows, mask=row_ok, other=0.0)
    cos = _cosine_tile(E, W, INV, rows, cols, row_ok, col_ok, D, stride_e, stride_w, IEEE, BLOCK_B, BLOCK_K,
                       BLOCK_D)
    z = _logits(cos, cols, tcol, tlogit, scale, threshold, HAS_THRESHOLD, EXCLUDE_TARGET)
    row_max = tl.load(ROW_MAX + rows, mask=row_ok, other=0.0)
    weight = tl.load(ROW_WEIGHT + rows, mask=row_ok, other=0.0)
    g = tl.exp(z - row_max[:, None]) * (weight * scale)[:, None]
    if HAS_THRESHOLD:
        g = tl.where(cos > threshold, 0.0, g)
    tgrad = tl.load(TGRAD + rows, mask=row_ok, other=0.0)
    g = tl.where(cols[None, :] == tcol[:, None], tgrad[:, None], g)
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g * inv[None, :], 0.0)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        e = tl.load(E + rows[:, None] * stride_e + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0).to(e.dtype)
        gc = g.to(e.dtype)
        if IEEE:
            de = tl.dot(gc, w, input_precision="ieee", out_dtype=INV.dtype.element_ty)
            dw = tl.dot(tl.trans(gc), e, input_precision="ieee", out_dtype=INV.dtype.element_ty)
        else:
            de = tl.dot(gc, w, out_dtype=INV.dtype.element_ty)
            dw = tl.dot(tl.trans(gc), e, out_dtype=INV.dtype.element_ty)
        tl.atomic_add(GE + rows[:, None] * D + ds[None, :], de, mask=row_ok[:, None] & d_ok[None, :])
        tl.atomic_add(GW + cols[:, None] * D + ds[None, :], dw, mask=col_ok[:, None] & d_ok[None, :])


def _dense_targets(targets: Targets, target_logit: torch.Tensor, batch: int):
    """Per-row target column (``-1``: elsewhere) and a ``(B,)`` vector holding ``target_logit``."""
    return targets.col.to(torch.int32).contiguous(), per_row(targets, target_logit, batch)


def _launch_args(emb, centres, p: ChunkProblem):
    emb_c = emb.to(p.compute_dtype).contiguous()
    centres = centres.contiguous()
    ieee = p.compute_dtype in (torch.float32, torch.float64)
    flags = dict(HAS_THRESHOLD=p.threshold is not None, EXCLUDE_TARGET=p.exclude_target, IEEE=ieee)
    scalars = (float(p.scale), float(p.threshold if p.threshold is not None else 0.0))
    return emb_c, centres, flags, scalars


def row_stats(emb, centres, inv_norm, targets: Targets, target_logit, p: ChunkProblem):
    """Local ``(row max (B,), sum of exp below it (B,))``, as :func:`torch_fused.row_stats`."""
    batch, (k, dim) = emb.shape[0], centres.shape
    start = 0.0 if p.exclude_target else float("-inf")
    m = torch.full((batch,), start, dtype=inv_norm.dtype, device=emb.device)
    if k == 0 or batch == 0:
        return m, torch.zeros_like(m)
    emb_c, centres, flags, (scale, threshold) = _launch_args(emb, centres, p)
    tcol, tlogit = _dense_targets(targets, target_logit, batch)
    block_b, block_k, block_d = _blocks(emb_c)
    splits = triton.cdiv(k, p.chunk_size)
    m_out = torch.empty((batch, splits), dtype=inv_norm.dtype, device=emb.device)
    s_out = torch.empty_like(m_out)
    grid = (triton.cdiv(batch, block_b), splits)
    _row_stats_kernel[grid](emb_c, centres, inv_norm, tcol, tlogit, m_out, s_out, batch, k, dim, p.chunk_size,
                            emb_c.stride(0), centres.stride(0), scale, threshold, **flags,
                            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d)
    m = m_out.amax(dim=1)
    return m, (s_out * torch.exp(m_out - m[:, None])).sum(dim=1)


def gradients(emb, centres, inv_norm, targets: Targets, target_logit, row_max, row_weight, target_grad,
              p: ChunkProblem, need_w: bool = True):
    """``(dE (B, D), dW (k, D))``, as :func:`torch_fused.gradients` (without ``need_w`` the
    kernel still accumulates the ``dW`` tiles; only their projection is skipped)."""
    batch, (k, dim) = emb.shape[0], centres.shape
    grad_e = torch.zeros((batch, dim), dtype=inv_norm.dtype, device=emb.device)
    grad_dot = torch.zeros((k, dim), dtype=inv_norm.dtype, device=emb.device)
    if k and batch:
        emb_c, centres_c, flags, (scale, threshold) = _launch_args(emb, centres, p)
        tcol, tlogit = _dense_targets(targets, target_logit, batch)
        tgrad = per_row(targets, target_grad.to(row_weight.dtype), batch)
        block_b, block_k, block_d = _blocks(emb_c)
        grid = (triton.cdiv(batch, block_b), triton.cdiv(k, block_k))
        _gradients_kernel[grid](emb_c, centres_c, inv_norm, tcol, tlogit, row_max.contiguous(),
                                row_weight.contiguous(), tgrad, grad_e, grad_dot, batch, k, dim,
                                emb_c.stride(0), centres_c.stride(0), scale, threshold, **flags,
                                BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d)
    if not need_w:
        return grad_e.to(emb.dtype), None
    grad_w = grad_dot if grad_dot.dtype == centres.dtype else torch.empty_like(centres)  # in place if it can
    for lo in range(0, k, p.chunk_size):
        hi = lo + p.chunk_size
        grad_w[lo:hi] = project_out_norm(grad_dot[lo:hi], centres[lo:hi], inv_norm[lo:hi])
    return grad_e.to(emb.dtype), grad_w
