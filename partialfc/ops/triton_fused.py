"""The fused objective's chunk walk as Triton kernels (CUDA; CPU tensors under
``TRITON_INTERPRET=1``, set before Triton is first imported).

Same interface as :mod:`partialfc.ops.torch_fused`. Both kernels run one program per
(split of the columns, block of rows): the splits, a whole number of column tiles each, on
grid axis 0 (CUDA's limit 2^31 - 1), the row blocks on axis 1 (limit 65,535, checked by
:func:`_grid`). A program walks its split tile by tile, computing the cosines (``tl.dot``
over ``D``) of its rows against the tile's centres.

- Forward keeps an online (max, sum of exp) per row; the ``(splits, B)`` partial results
  are combined by torch.
- Backward recomputes the tile's cosines and its ``dL/d(E . w)``, then per ``D`` slice adds
  its share of ``dE`` into the split's own ``(B, D)`` slice of a ``(splits, B, D)`` buffer
  (a plain load-add-store: no other program touches it), summed over the splits by torch
  afterwards, in a fixed order: ``dE`` is bit-reproducible. Its share of ``dW`` (before the
  normalisation's derivative, applied afterwards chunk by chunk) goes in by atomic adds,
  one per row block (``cdiv(B, BLOCK_B)`` per element), so with more than one row block the
  last bits of ``dW`` may vary from run to run; with the centres frozen (``COMPUTE_DW``
  off) the kernel does no ``dW`` work at all.

Pointer offsets of 2-D tiles go through :func:`_tile_ptrs`, in int64 (a shard of 10^7
centres at ``D = 512`` has 5 x 10^9 elements). Neither pass holds ``(B, k)``. The number of
splits aims at :data:`_PROGRAMS` programs per launch, which also bounds the ``dE`` buffer
to about ``_PROGRAMS * BLOCK_B * D`` numbers (134 MB in fp32 at ``D = 512``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from partialfc.ops.chunking import ChunkProblem, per_row, project_out_norm
from partialfc.ops.targets import Targets

_NEG_INF = tl.constexpr(float("-inf"))
_PROGRAMS = 1024  # programs per launch the column splits aim at (several waves on a GPU)
GRID_AXIS_LIMIT = 65_535  # CUDA's limit on grid axes 1 and 2


@dataclass(frozen=True)
class Config:
    """Tile sizes (rows, columns, depth) and warps per program."""

    block_b: int
    block_k: int
    block_d: int
    num_warps: int = 4


# per compute dtype on CUDA: no register spills on sm_90 (tests/test_triton_compile.py)
CUDA_CONFIGS = {torch.bfloat16: Config(64, 64, 64), torch.float16: Config(64, 64, 64),
                torch.float32: Config(64, 64, 16, num_warps=8), torch.float64: Config(32, 32, 16, num_warps=8)}
INTERPRETER_CONFIG = Config(16, 16, 16)  # small: the tests' few centres span several tiles


def _config(emb: torch.Tensor) -> Config:
    """The tiles for ``emb``'s device and (compute) dtype."""
    return CUDA_CONFIGS[emb.dtype] if emb.device.type == "cuda" else INTERPRETER_CONFIG


def _grid(k: int, batch: int, cfg: Config) -> tuple[int, tuple[int, int]]:
    """``(columns per split, grid)`` for ``k`` columns and ``batch`` rows: ``grid = (splits,
    row blocks)``, the splits a whole number of ``block_k`` tiles, aiming at ``_PROGRAMS``
    programs. Raises where the row blocks exceed :data:`GRID_AXIS_LIMIT`."""
    row_blocks = triton.cdiv(batch, cfg.block_b)
    if row_blocks > GRID_AXIS_LIMIT:
        raise ValueError(f"{batch} rows make {row_blocks} row blocks, over CUDA's {GRID_AXIS_LIMIT} on grid axis 1")
    tiles = triton.cdiv(k, cfg.block_k)
    tiles_per_split = triton.cdiv(tiles, max(1, _PROGRAMS // row_blocks))
    return tiles_per_split * cfg.block_k, (triton.cdiv(tiles, tiles_per_split), row_blocks)


def _launch(kernel, grid, device: torch.device, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``'s GPU (Triton launches on the current
    CUDA device, not the tensors'); no device switch off CUDA."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


@triton.jit
def _tile_ptrs(BASE, index, stride, ds):
    """Pointers ``BASE + index[:, None] * stride + ds[None, :]``, computed in int64."""
    return BASE + index.to(tl.int64)[:, None] * stride + ds[None, :]


@triton.jit
def _row_block(TCOL, TLOGIT, B, BLOCK_B: tl.constexpr):
    """This program's rows (axis 1), their mask, target columns and target logits."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tcol = tl.load(TCOL + rows, mask=row_ok, other=-1)
    tlogit = tl.load(TLOGIT + rows, mask=row_ok, other=0.0)
    return rows, row_ok, tcol, tlogit


@triton.jit
def _cosine_tile(E, W, INV, rows, cols, row_ok, col_ok, D, stride_e, stride_w,
                 PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Clamped cosines (BLOCK_B, BLOCK_K) in INV's dtype."""
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=INV.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        e = tl.load(_tile_ptrs(E, rows, stride_e, ds), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(_tile_ptrs(W, cols, stride_w, ds), mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(e, tl.trans(w.to(e.dtype)), acc, input_precision=PRECISION)
    inv = tl.load(INV + cols, mask=col_ok, other=1.0)
    return tl.minimum(tl.maximum(acc * inv[None, :], -1.0), 1.0)


@triton.jit
def _split(K, cols_per_split):
    """Columns ``[lo, hi)`` of split ``program_id(0)``."""
    lo = tl.program_id(0) * cols_per_split
    return lo, tl.minimum(lo + cols_per_split, K)


@triton.jit
def _tile_logits(E, W, INV, LIVE, rows, row_ok, tcol, tlogit, c0, hi, D, stride_e, stride_w, scale, threshold,
                 HAS_THRESHOLD: tl.constexpr, EXCLUDE_TARGET: tl.constexpr, HAS_LIVE: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``c0 + arange(BLOCK_K)``, their mask (``< hi``), the clamped cosines and the
    logits (BLOCK_B, BLOCK_K): ``scale * cos`` (filtered), the target logit (or -inf) in the
    target column, -inf in a column ``LIVE`` (int8, with ``HAS_LIVE``) says takes no part."""
    cols = c0 + tl.arange(0, BLOCK_K)
    col_ok = cols < hi
    cos = _cosine_tile(E, W, INV, rows, cols, row_ok, col_ok, D, stride_e, stride_w, PRECISION, BLOCK_B, BLOCK_K,
                       BLOCK_D)
    kept = cos
    if HAS_THRESHOLD:
        kept = tl.where(cos > threshold, 0.0, cos)
    is_target = cols[None, :] == tcol[:, None]
    if EXCLUDE_TARGET:
        z = tl.where(is_target, _NEG_INF, kept * scale)
    else:
        z = tl.where(is_target, tlogit[:, None], kept * scale)
    if HAS_LIVE:
        live = tl.load(LIVE + cols, mask=col_ok, other=0)
        z = tl.where(live[None, :] != 0, z, _NEG_INF)
    return cols, col_ok, cos, z


@triton.jit
def _row_stats_kernel(E, W, INV, LIVE, TCOL, TLOGIT, M_OUT, S_OUT, B, K, D, cols_per_split, stride_e, stride_w,
                      scale, threshold, HAS_THRESHOLD: tl.constexpr, EXCLUDE_TARGET: tl.constexpr,
                      HAS_LIVE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online (max, sum of exp) of the rows over split ``program_id(0)``, into ``(splits, B)``."""
    rows, row_ok, tcol, tlogit = _row_block(TCOL, TLOGIT, B, BLOCK_B)
    if EXCLUDE_TARGET:
        m = tl.zeros((BLOCK_B,), dtype=INV.dtype.element_ty)
    else:
        m = tl.full((BLOCK_B,), _NEG_INF, dtype=INV.dtype.element_ty)
    s = tl.zeros((BLOCK_B,), dtype=INV.dtype.element_ty)
    lo, hi = _split(K, cols_per_split)
    for c0 in range(lo, hi, BLOCK_K):
        cols, col_ok, cos, z = _tile_logits(E, W, INV, LIVE, rows, row_ok, tcol, tlogit, c0, hi, D, stride_e,
                                            stride_w, scale, threshold, HAS_THRESHOLD, EXCLUDE_TARGET, HAS_LIVE,
                                            PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        z = tl.where(col_ok[None, :], z, _NEG_INF)
        new_m = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(new_m == _NEG_INF, 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = new_m
    out = tl.program_id(0) * B + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)


@triton.jit
def _gradients_kernel(E, W, INV, LIVE, TCOL, TLOGIT, ROW_MAX, ROW_WEIGHT, TGRAD, GE_SPLITS, GW, B, K, D,
                      cols_per_split, stride_e, stride_w, scale, threshold, HAS_THRESHOLD: tl.constexpr,
                      EXCLUDE_TARGET: tl.constexpr, HAS_LIVE: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_DW: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """This split's ``dE`` into ``GE_SPLITS[program_id(0)] (B, D)``; with ``COMPUTE_DW``, the
    unprojected ``dW`` added into ``GW (K, D)``."""
    rows, row_ok, tcol, tlogit = _row_block(TCOL, TLOGIT, B, BLOCK_B)
    split_rows = tl.program_id(0) * B + rows  # this program's rows of GE_SPLITS seen as (splits * B, D)
    row_max = tl.load(ROW_MAX + rows, mask=row_ok, other=0.0)
    row_scale = tl.load(ROW_WEIGHT + rows, mask=row_ok, other=0.0) * scale
    tgrad = tl.load(TGRAD + rows, mask=row_ok, other=0.0)
    lo, hi = _split(K, cols_per_split)
    for c0 in range(lo, hi, BLOCK_K):
        cols, col_ok, cos, z = _tile_logits(E, W, INV, LIVE, rows, row_ok, tcol, tlogit, c0, hi, D, stride_e,
                                            stride_w, scale, threshold, HAS_THRESHOLD, EXCLUDE_TARGET, HAS_LIVE,
                                            PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        g = tl.exp(z - row_max[:, None]) * row_scale[:, None]
        if HAS_THRESHOLD:
            g = tl.where(cos > threshold, 0.0, g)
        g = tl.where(cols[None, :] == tcol[:, None], tgrad[:, None], g)
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g * inv[None, :], 0.0).to(E.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            w = tl.load(_tile_ptrs(W, cols, stride_w, ds), mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            ge = _tile_ptrs(GE_SPLITS, split_rows, D, ds)
            ge_ok = row_ok[:, None] & d_ok[None, :]
            tl.store(ge, tl.dot(g, w.to(g.dtype), tl.load(ge, mask=ge_ok, other=0.0), input_precision=PRECISION),
                     mask=ge_ok)
            if COMPUTE_DW:
                e = tl.load(_tile_ptrs(E, rows, stride_e, ds), mask=ge_ok, other=0.0)
                dw = tl.dot(tl.trans(g), e, tl.zeros((BLOCK_K, BLOCK_D), dtype=INV.dtype.element_ty),
                            input_precision=PRECISION)
                tl.atomic_add(_tile_ptrs(GW, cols, D, ds), dw, mask=col_ok[:, None] & d_ok[None, :])


def _dense_targets(targets: Targets, target_logit: torch.Tensor, batch: int):
    """The columns that take part (int8 ``(k,)``; the target columns stand in when all do,
    unread), the per-row target column (``-1``: elsewhere) and a ``(B,)`` vector holding
    ``target_logit``."""
    tcol = targets.col.to(torch.int32).contiguous()
    live = tcol if targets.columns is None else targets.columns.to(torch.int8).contiguous()
    return live, tcol, per_row(targets, target_logit, batch)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t (n, D)`` itself if its rows are contiguous (any row stride), else a copy."""
    return t if t.stride(1) == 1 else t.contiguous()


def _flags(p: ChunkProblem, targets: Targets) -> dict:
    """The kernels' constexpr flags for ``p`` and ``targets`` (tl.dot in IEEE precision for
    fp32 and fp64)."""
    precision = "ieee" if p.compute_dtype in (torch.float32, torch.float64) else "tf32"  # ignored for bf16/fp16
    return dict(HAS_THRESHOLD=p.threshold is not None, EXCLUDE_TARGET=p.exclude_target,
                HAS_LIVE=targets.columns is not None, PRECISION=precision)


def _launch_args(emb, centres, p: ChunkProblem, targets: Targets):
    """Matmul-dtype embeddings, centres, kernel flags and ``(scale, threshold)``."""
    scalars = (float(p.scale), float(p.threshold if p.threshold is not None else 0.0))
    return _unit_stride(emb.to(p.compute_dtype)), _unit_stride(centres), _flags(p, targets), scalars


def _meta(cfg: Config, flags: dict) -> dict:
    """Keyword arguments of a launch: the flags, the tiles and the warps."""
    return dict(**flags, BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)


def row_stats(emb, centres, inv_norm, targets: Targets, target_logit, p: ChunkProblem):
    """Local ``(row max (B,), sum of exp below it (B,))``, as :func:`torch_fused.row_stats`."""
    batch, (k, dim) = emb.shape[0], centres.shape
    start = 0.0 if p.exclude_target else float("-inf")
    m = torch.full((batch,), start, dtype=inv_norm.dtype, device=emb.device)
    if k == 0 or batch == 0:
        return m, torch.zeros_like(m)
    emb_c, centres_c, flags, (scale, threshold) = _launch_args(emb, centres, p, targets)
    live, tcol, tlogit = _dense_targets(targets, target_logit, batch)
    cfg = _config(emb_c)
    cols_per_split, grid = _grid(k, batch, cfg)
    m_out = torch.empty((grid[0], batch), dtype=inv_norm.dtype, device=emb.device)
    s_out = torch.empty_like(m_out)
    _launch(_row_stats_kernel, grid, emb.device, emb_c, centres_c, inv_norm, live, tcol, tlogit, m_out, s_out, batch,
            k, dim, cols_per_split, emb_c.stride(0), centres_c.stride(0), scale, threshold, **_meta(cfg, flags))
    m = m_out.amax(dim=0)
    shift = torch.where(m > float("-inf"), m, 0.0)  # a row no column takes part in: no -inf - -inf
    return m, (s_out * torch.exp(m_out - shift)).sum(dim=0)


def gradients(emb, centres, inv_norm, targets: Targets, target_logit, row_max, row_weight, target_grad,
              p: ChunkProblem, need_w: bool = True):
    """``(dE (B, D), dW (k, D))``, as :func:`torch_fused.gradients` (``dW`` is ``None``, and
    the kernel does no ``dW`` work, unless ``need_w``)."""
    batch, (k, dim) = emb.shape[0], centres.shape
    grad_dot = torch.zeros((k, dim), dtype=inv_norm.dtype, device=emb.device) if need_w else None
    if not (k and batch):
        grad_e = torch.zeros((batch, dim), dtype=inv_norm.dtype, device=emb.device)
    else:
        emb_c, centres_c, flags, (scale, threshold) = _launch_args(emb, centres, p, targets)
        live, tcol, tlogit = _dense_targets(targets, target_logit, batch)
        tgrad = per_row(targets, target_grad.to(row_weight.dtype), batch)
        cfg = _config(emb_c)
        cols_per_split, grid = _grid(k, batch, cfg)
        grad_e_splits = torch.zeros((grid[0], batch, dim), dtype=inv_norm.dtype, device=emb.device)
        _launch(_gradients_kernel, grid, emb.device, emb_c, centres_c, inv_norm, live, tcol, tlogit,
                row_max.contiguous(), row_weight.contiguous(), tgrad, grad_e_splits,
                grad_e_splits if grad_dot is None else grad_dot, batch, k, dim, cols_per_split, emb_c.stride(0),
                centres_c.stride(0), scale, threshold, COMPUTE_DW=need_w, **_meta(cfg, flags))
        grad_e = grad_e_splits.sum(dim=0)
    if not need_w:
        return grad_e.to(emb.dtype), None
    grad_w = grad_dot if grad_dot.dtype == centres.dtype else torch.empty_like(centres)  # in place if it can
    for lo in range(0, k, p.chunk_size):
        hi = lo + p.chunk_size
        grad_w[lo:hi] = project_out_norm(grad_dot[lo:hi], centres[lo:hi], inv_norm[lo:hi])
    return grad_e.to(emb.dtype), grad_w
