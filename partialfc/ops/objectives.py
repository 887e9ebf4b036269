"""Objectives over a row of logits whose columns are spread over the ranks of a group.

Each rank holds the cosines ``cos (B, k)`` of the same ``B`` rows of the global batch
against a disjoint set of ``k`` columns (its sampled class centres); ``targets``
(:class:`~partialfc.ops.targets.Targets`) says which rows have their target among them and
in which column. The logits are ``z = scale * cos`` except at the targets, where the
caller's ``target_logit`` (the margin-transformed ``s * psi(c_y)``, shape ``(n,)``, aligned
with ``targets.rows``) is used. Forming ``z``, the reductions and the gradient are fused
into one autograd function: ``z`` is built once in fp32 (fp64 stays fp64) and turned into
``exp(z - row_max)`` in place, and backward writes one gradient block. Reductions return a
per-row loss vector identical on every rank; backward needs no communication.

Both objectives share the same two collectives (MAX of row maxima, then one SUM of (sum of
exp, target logit)); :meth:`RowObjective.combine` turns those statistics into the loss and
the gradient factors, for this plain path and for :mod:`partialfc.ops.fused` alike:

- :func:`softmax_cross_entropy`: ``LSE_j(z_j) - z_y``;
- :func:`dissected_softmax` (D-Softmax): ``softplus(t - z_y) + log(1 + r * sum_{j != y} exp(z_j))``.

Called with plain logits (``scale=1``, no ``target_logit``) they are the textbook
objectives; the target logit is then read from ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


def sum_statistics(local_sum: torch.Tensor, targets: Targets, target_logit: torch.Tensor, group):
    """The objectives' second collective: one SUM of (this rank's sum of exp (B,), the target
    logits it holds, aligned with ``targets.rows``). Returns ``(sum_exp (B,), target (B,))``, global."""
    stats = local_sum.new_zeros((2, local_sum.shape[0]))
    stats[0] = local_sum
    stats[1, targets.rows] = targets.only_local(target_logit.to(stats.dtype))
    all_reduce(stats, dist.ReduceOp.SUM, group)
    return stats[0], stats[1]


def _row_statistics(z, targets: Targets, target_logit, group, exclude_target: bool):
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
    return (row_max, *sum_statistics(z.sum(dim=1), targets, target_logit, group))


def _cos_gradient(weights: torch.Tensor, row_factor: torch.Tensor, scale: float, targets: Targets, dtype):
    """``scale * weights * row_factor[:, None]`` with the target entries zeroed (their
    gradient flows through ``target_logit``), in the dtype of the cosines."""
    grad = weights * (row_factor * scale)[:, None]
    targets.put(grad, 0.0)
    return grad.to(dtype)


class RowTerms(NamedTuple):
    """What an objective makes of a row's global statistics (each ``(B,)``, identical on every
    rank): the per-row ``loss``; the ``weight`` with ``dL/dz_j = weight * exp(z_j - row_max)``
    for every non-target ``j``; the ``target_pull`` ``dL/dz_y``."""

    loss: torch.Tensor
    weight: torch.Tensor
    target_pull: torch.Tensor


@dataclass(frozen=True)
class RowObjective:
    """Which objective a loss runs over its row of logits, as data both paths read: softmax
    cross-entropy, or (``dissected``) D-Softmax with ``intra_logit`` and ``inter_scale``
    (see :func:`dissected_softmax`). :meth:`combine` holds its formulas (the plain path and
    :mod:`partialfc.ops.fused` both call it); calling it runs the plain (unfused) objective on
    ``cos``."""

    dissected: bool = False
    intra_logit: float = 0.0
    inter_scale: float = 1.0

    def combine(self, row_max: torch.Tensor, sum_exp: torch.Tensor, target: torch.Tensor) -> RowTerms:
        """The loss and gradient factors of each row from its global ``row_max`` (the max of
        the included logits: the target's too for softmax, ``0`` too for D-Softmax),
        ``sum_exp`` (``sum exp(z_j - row_max)`` over the included logits) and ``target``
        (``z_y``)."""
        if self.dissected:  # softplus(t_intra - z_y) + log(1 + r * sum_{j != y} exp(z_j))
            denom = torch.exp(-row_max) + self.inter_scale * sum_exp  # 1 + r*sum exp(z), times exp(-M)
            intra_gap = self.intra_logit - target
            return RowTerms(F.softplus(intra_gap) + row_max + torch.log(denom), self.inter_scale / denom,
                            -torch.sigmoid(intra_gap))
        weight = sum_exp.reciprocal()  # LSE_j(z_j) - z_y
        return RowTerms(torch.log(sum_exp) + row_max - target, weight, torch.exp(target - row_max) * weight - 1.0)

    def __call__(self, cos: torch.Tensor, targets: Targets, group=None, *, scale: float = 1.0,
                 target_logit: torch.Tensor | None = None) -> torch.Tensor:
        if target_logit is None:
            target_logit = scale * cos[targets.rows, targets.cols].to(torch.promote_types(cos.dtype, torch.float32))
        with torch.autocast(device_type=cos.device.type, enabled=False):
            return _PlainRows.apply(cos, targets, target_logit, float(scale), group, self)


class _PlainRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, targets, target_logit, scale, group, objective: RowObjective):
        z = _scaled_logits(cos, scale)
        # D-Softmax's inter term runs over the non-targets only
        targets.put(z, float("-inf") if objective.dissected else target_logit.detach().to(z.dtype))
        targets.drop_columns(z)
        row_max, sum_exp, target = _row_statistics(z, targets, target_logit, group,
                                                   exclude_target=objective.dissected)
        terms = objective.combine(row_max, sum_exp, target)
        ctx.save_for_backward(z, terms.weight, targets.only_local(terms.target_pull[targets.rows]))
        ctx.targets, ctx.scale, ctx.cos_dtype = targets, scale, cos.dtype
        return terms.loss

    @staticmethod
    def backward(ctx, grad_rows):
        exps, weight, target_pull = ctx.saved_tensors
        grad_cos = _cos_gradient(exps, grad_rows * weight, ctx.scale, ctx.targets, ctx.cos_dtype)
        return grad_cos, None, target_pull * grad_rows[ctx.targets.rows], None, None, None


def softmax_cross_entropy(cos: torch.Tensor, targets: Targets, group=None, *, scale: float = 1.0,
                          target_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``LSE_j(z_j) - z_y`` over the columns of all ranks, shape ``(B,)``.

    ``z = scale * cos`` with ``target_logit`` (shape ``(n,)``, aligned with ``targets.rows``)
    at the targets. Two collectives: MAX of the row maxima, then one SUM of (sum of
    exp, target logit). ``dL/dz = softmax - onehot`` is computed locally in backward."""
    return RowObjective()(cos, targets, group, scale=scale, target_logit=target_logit)


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
    objective = RowObjective(dissected=True, intra_logit=float(intra_logit), inter_scale=float(inter_scale))
    return objective(cos, targets, group, scale=scale, target_logit=target_logit)

