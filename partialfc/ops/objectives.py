"""Objectives over a row of logits whose columns are spread over the ranks of a group.

Each rank holds the cosines ``cos (B, k)`` of the same ``B`` rows of the global batch
against a disjoint set of ``k`` columns (its sampled class centres); ``targets``
(:class:`~partialfc.ops.targets.Targets`) says which rows have their target among them and
in which column. The logits are ``z = scale * cos`` except at the targets, where the
caller's ``target_logit`` (the margin-transformed ``s * psi(c_y)``, shape ``(n,)``, aligned
with ``targets.rows``) is used. Forming ``z``, the reductions and the gradient are fused
into one autograd function per objective: ``z`` is built once in fp32 (fp64 stays fp64) and
turned into probabilities in place, and backward writes one gradient block. Reductions
return a per-row loss vector identical on every rank; backward needs no communication.

Both objectives share the same two collectives (MAX of row maxima, then one SUM of (sum of
exp, target logit)):

- :func:`softmax_cross_entropy`: ``LSE_j(z_j) - z_y``;
- :func:`dissected_softmax` (D-Softmax): ``softplus(t - z_y) + log(1 + r * sum_{j != y} exp(z_j))``.

Called with plain logits (``scale=1``, no ``target_logit``) they are the textbook
objectives; the target logit is then read from ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partialfc.ops.collectives import all_reduce
from partialfc.ops.targets import Targets


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 0:  # a rank may own no sampled centre at rate 0
        return logits.new_full((logits.shape[0],), float("-inf"))
    return logits.amax(dim=1)


def _scaled_logits(cos: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * cos`` in fp32 (fp64 kept), upcast and scaled in one pass: a 1-element
    fp32 factor (not a 0-dim one) makes type promotion compute in fp32."""
    factor = torch.full((1,), scale, dtype=torch.promote_types(cos.dtype, torch.float32), device=cos.device)
    return torch.mul(cos, factor)


def _row_statistics(z, rows, target_logit, group, exclude_target: bool):
    """Turn ``z`` (B, k) into ``exp(z - row_max)`` in place; two collectives.

    Returns ``row_max (B,)``: the global max of the included logits (floored at 0 when the
    target is excluded, the ``0`` standing for D-Softmax's ``1``); ``sum_exp (B,)``: the
    global sum of the exponentials; ``target (B,)``: ``z_y`` gathered from its rank. The
    target column of ``z`` must already hold ``target_logit`` (or ``-inf`` if excluded)."""
    row_max = _row_max(z)
    if exclude_target:
        row_max.clamp_min_(0.0)
    all_reduce(row_max, dist.ReduceOp.MAX, group)
    z.sub_(row_max[:, None]).exp_()
    stats = z.new_zeros((2, z.shape[0]))
    stats[0] = z.sum(dim=1)
    stats[1, rows] = target_logit.to(z.dtype)
    all_reduce(stats, dist.ReduceOp.SUM, group)
    return row_max, stats[0], stats[1]


def _cos_gradient(weights: torch.Tensor, row_factor: torch.Tensor, scale: float, rows, cols, dtype):
    """``scale * weights * row_factor[:, None]`` with the target entries zeroed (their
    gradient flows through ``target_logit``), in the dtype of the cosines."""
    grad = weights * (row_factor * scale)[:, None]
    grad[rows, cols] = 0.0
    return grad.to(dtype)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, targets, target_logit, scale, group):
        rows, cols = targets.rows, targets.cols
        z = _scaled_logits(cos, scale)
        z[rows, cols] = target_logit.detach().to(z.dtype)
        row_max, sum_exp, target = _row_statistics(z, rows, target_logit, group, exclude_target=False)
        probs = z.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, rows, cols)
        ctx.scale, ctx.cos_dtype = scale, cos.dtype
        return torch.log(sum_exp) + row_max - target

    @staticmethod
    def backward(ctx, grad_rows):
        probs, rows, cols = ctx.saved_tensors
        grad_target = (probs[rows, cols] - 1.0) * grad_rows[rows]
        grad_cos = _cos_gradient(probs, grad_rows, ctx.scale, rows, cols, ctx.cos_dtype)
        return grad_cos, None, grad_target, None, None


class _DissectedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, targets, target_logit, scale, group, intra_logit, inter_scale):
        rows, cols = targets.rows, targets.cols
        z = _scaled_logits(cos, scale)
        z[rows, cols] = float("-inf")  # the inter term runs over the non-targets only
        row_max, sum_exp, target = _row_statistics(z, rows, target_logit, group, exclude_target=True)
        denom = torch.exp(-row_max) + inter_scale * sum_exp  # 1 + r*sum exp(z), times exp(-M)
        intra_gap = intra_logit - target
        ctx.save_for_backward(z, inter_scale / denom, torch.sigmoid(intra_gap[rows]), rows, cols)
        ctx.scale, ctx.cos_dtype = scale, cos.dtype
        return F.softplus(intra_gap) + row_max + torch.log(denom)

    @staticmethod
    def backward(ctx, grad_rows):
        exps, inter_weight, intra_pull, rows, cols = ctx.saved_tensors
        grad_cos = _cos_gradient(exps, grad_rows * inter_weight, ctx.scale, rows, cols, ctx.cos_dtype)
        return grad_cos, None, -intra_pull * grad_rows[rows], None, None, None, None


def _apply(function: type[torch.autograd.Function], cos, targets, target_logit, scale, group, *args):
    """Run ``function`` outside autocast; without ``target_logit`` read it from ``cos``."""
    if target_logit is None:
        target_logit = scale * cos[targets.rows, targets.cols].to(torch.promote_types(cos.dtype, torch.float32))
    with torch.autocast(device_type=cos.device.type, enabled=False):
        return function.apply(cos, targets, target_logit, float(scale), group, *args)


def softmax_cross_entropy(cos: torch.Tensor, targets: Targets, group=None, *, scale: float = 1.0,
                          target_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``LSE_j(z_j) - z_y`` over the columns of all ranks, shape ``(B,)``.

    ``z = scale * cos`` with ``target_logit`` (shape ``(n,)``, aligned with ``targets.rows``)
    at the targets. Two collectives: MAX of the row maxima, then one SUM of (sum of
    exp, target logit). ``dL/dz = softmax - onehot`` is computed locally in backward."""
    return _apply(_SoftmaxCrossEntropy, cos, targets, target_logit, scale, group)


def dissected_softmax(cos: torch.Tensor, targets: Targets, group=None, *, intra_logit: float,
                      inter_scale: float = 1.0, scale: float = 1.0,
                      target_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row D-Softmax ``softplus(intra_logit - z_y) + log(1 + inter_scale * sum_{j!=y} exp(z_j))``.

    ``z`` as in :func:`softmax_cross_entropy`. ``intra_logit`` is the end point ``s*d`` of
    the intra term (in logit units); ``inter_scale`` multiplies the inter sum (``K`` to
    rescale a 1/K sample). The inter term is a log-sum-exp over ``{0} U {z_j, j != y}``
    (global MAX floored at 0, SUM of exp); the target logit is gathered by the same SUM.
    Backward is local: ``dL/dz_j = r e^{z_j} / (1 + r sum)`` for ``j != y`` (independent of
    ``z_y``) and ``dL/dz_y = -sigmoid(intra_logit - z_y)``."""
    return _apply(_DissectedSoftmax, cos, targets, target_logit, scale, group, float(intra_logit),
                  float(inter_scale))


@dataclass(frozen=True)
class RowObjective:
    """Which objective a loss runs over its row of logits, as data both paths read: softmax
    cross-entropy, or (``dissected``) D-Softmax with ``intra_logit`` and ``inter_scale``
    (see :func:`dissected_softmax`). Calling it runs the plain (unfused) objective on ``cos``."""

    dissected: bool = False
    intra_logit: float = 0.0
    inter_scale: float = 1.0

    def __call__(self, cos: torch.Tensor, targets: Targets, group=None, *, scale: float = 1.0,
                 target_logit: torch.Tensor | None = None) -> torch.Tensor:
        if self.dissected:
            return dissected_softmax(cos, targets, group, intra_logit=self.intra_logit,
                                     inter_scale=self.inter_scale, scale=scale, target_logit=target_logit)
        return softmax_cross_entropy(cos, targets, group, scale=scale, target_logit=target_logit)
