"""Objectives over a row of logits whose columns are spread over the ranks of a group.

Each rank holds ``logits`` of shape ``(B, k)`` for the same ``B`` rows of the global batch
and a disjoint set of ``k`` columns (its sampled class centres). ``target_col[i]`` is the
column of row ``i``'s target on this rank, or ``-1`` when the target lives elsewhere.
Reductions run in the logits' dtype (fp32 or fp64; never half precision) and return a
per-row loss vector identical on every rank. Backward needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from partialfc.head.collectives import all_reduce


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 0:  # a rank may own no sampled centre at rate 0
        return logits.new_full((logits.shape[0],), float("-inf"))
    return logits.amax(dim=1)


def _target_mask(target_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.nonzero(target_col >= 0, as_tuple=True)[0]
    return rows, target_col[rows]


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_col, group):
        rows, cols = _target_mask(target_col)
        row_max = all_reduce(_row_max(logits), dist.ReduceOp.MAX, group)
        probs = torch.exp(logits - row_max[:, None])
        stats = logits.new_zeros((2, logits.shape[0]))
        stats[0] = probs.sum(dim=1)
        stats[1, rows] = logits[rows, cols]
        all_reduce(stats, dist.ReduceOp.SUM, group)
        sum_exp, target_logit = stats[0], stats[1]
        probs /= sum_exp[:, None]
        ctx.save_for_backward(probs, rows, cols)
        return torch.log(sum_exp) + row_max - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        probs, rows, cols = ctx.saved_tensors
        grad = probs * grad_rows[:, None]
        grad[rows, cols] -= grad_rows[rows]
        return grad, None, None


def softmax_cross_entropy(logits: torch.Tensor, target_col: torch.Tensor, group=None) -> torch.Tensor:
    """Per-row ``LSE_j(z_j) - z_y`` over the columns of all ranks, shape ``(B,)``.

    Two collectives per call: MAX of the row maxima, then one SUM of (sum of exp, target
    logit). ``dL/dz = softmax - onehot`` is computed locally in backward."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _SoftmaxCrossEntropy.apply(logits, target_col, group)
