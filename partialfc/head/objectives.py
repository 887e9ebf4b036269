"""Objectives over a row of logits whose columns are spread over the ranks of a group.

Each rank holds ``logits`` of shape ``(B, k)`` for the same ``B`` rows of the global batch
and a disjoint set of ``k`` columns (its sampled class centres). ``target_col[i]`` is the
column of row ``i``'s target on this rank, or ``-1`` when the target lives elsewhere.
Reductions run in the logits' dtype (fp32 or fp64; half precision is upcast to fp32) and
return a per-row loss vector identical on every rank. Backward needs no communication.

Two objectives share the same two collectives (MAX of row maxima, then one SUM of (sum of
exp, target logit)):

- :func:`softmax_cross_entropy`: ``LSE_j(z_j) - z_y``;
- :func:`dissected_softmax` (D-Softmax): ``softplus(t - z_y) + log(1 + r * sum_{j != y} exp(z_j))``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partialfc.head.collectives import all_reduce


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 0:  # a rank may own no sampled centre at rate 0
        return logits.new_full((logits.shape[0],), float("-inf"))
    return logits.amax(dim=1)


def _target_mask(target_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.nonzero(target_col >= 0, as_tuple=True)[0]
    return rows, target_col[rows]


def _row_statistics(logits, rows, cols, group, exclude_target: bool):
    """The cross-rank statistics of every row, computed with two collectives.

    Returns ``row_max (B,)``: the global max of the included logits (floored at 0 when the
    target is excluded, the ``0`` standing for D-Softmax's ``1``); ``exps (B, k)``:
    ``exp(z - row_max)`` of this rank's columns (0 at the target when excluded); ``sum_exp
    (B,)``: their global sum; ``target_logit (B,)``: ``z_y`` gathered from its rank."""
    if exclude_target:
        exps = logits.index_put((rows, cols), logits.new_tensor(float("-inf")))
        row_max = all_reduce(_row_max(exps).clamp_min(0.0), dist.ReduceOp.MAX, group)
        exps.sub_(row_max[:, None])
    else:
        row_max = all_reduce(_row_max(logits), dist.ReduceOp.MAX, group)
        exps = logits - row_max[:, None]
    exps.exp_()
    stats = logits.new_zeros((2, logits.shape[0]))
    stats[0] = exps.sum(dim=1)
    stats[1, rows] = logits[rows, cols]
    all_reduce(stats, dist.ReduceOp.SUM, group)
    return row_max, exps, stats[0], stats[1]


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_col, group):
        rows, cols = _target_mask(target_col)
        row_max, probs, sum_exp, target_logit = _row_statistics(logits, rows, cols, group, False)
        probs /= sum_exp[:, None]
        ctx.save_for_backward(probs, rows, cols)
        return torch.log(sum_exp) + row_max - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        probs, rows, cols = ctx.saved_tensors
        grad = probs * grad_rows[:, None]
        grad[rows, cols] -= grad_rows[rows]
        return grad, None, None


class _DissectedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_col, group, intra_logit, inter_scale):
        rows, cols = _target_mask(target_col)
        row_max, exps, sum_exp, target_logit = _row_statistics(logits, rows, cols, group, True)
        denom = torch.exp(-row_max) + inter_scale * sum_exp  # 1 + r*sum exp(z), times exp(-M)
        intra_gap = intra_logit - target_logit
        ctx.save_for_backward(exps, inter_scale / denom, torch.sigmoid(intra_gap[rows]), rows, cols)
        return F.softplus(intra_gap) + row_max + torch.log(denom)

    @staticmethod
    def backward(ctx, grad_rows):
        exps, inter_weight, intra_pull, rows, cols = ctx.saved_tensors
        grad = exps * (grad_rows * inter_weight)[:, None]  # 0 at the target column
        grad[rows, cols] = -intra_pull * grad_rows[rows]
        return grad, None, None, None, None


def _in_fp32(function: type[torch.autograd.Function], logits: torch.Tensor, *args) -> torch.Tensor:
    """Apply ``function`` with half-precision logits upcast and autocast disabled."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return function.apply(logits, *args)


def softmax_cross_entropy(logits: torch.Tensor, target_col: torch.Tensor, group=None) -> torch.Tensor:
    """Per-row ``LSE_j(z_j) - z_y`` over the columns of all ranks, shape ``(B,)``.

    Two collectives per call: MAX of the row maxima, then one SUM of (sum of exp, target
    logit). ``dL/dz = softmax - onehot`` is computed locally in backward."""
    return _in_fp32(_SoftmaxCrossEntropy, logits, target_col, group)


def dissected_softmax(logits: torch.Tensor, target_col: torch.Tensor, group=None, *,
                      intra_logit: float, inter_scale: float = 1.0) -> torch.Tensor:
    """Per-row D-Softmax ``softplus(intra_logit - z_y) + log(1 + inter_scale * sum_{j!=y} exp(z_j))``.

    ``intra_logit`` is the end point ``s*d`` of the intra term (in logit units);
    ``inter_scale`` multiplies the inter sum (``K`` to rescale a 1/K sample). The inter term
    is a log-sum-exp over ``{0} U {z_j, j != y}`` (global MAX floored at 0, SUM of exp); the
    target logit is gathered by the same SUM. Same two collectives as
    :func:`softmax_cross_entropy`; backward is local: ``dL/dz_j = r e^{z_j} / (1 + r sum)``
    for ``j != y`` (independent of ``z_y``) and ``dL/dz_y = -sigmoid(intra_logit - z_y)``."""
    return _in_fp32(_DissectedSoftmax, logits, target_col, group, float(intra_logit), float(inter_scale))
