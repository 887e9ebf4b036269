"""Autograd-aware collectives for tensors whose first dimension differs across ranks.

``torch.distributed.all_gather`` needs equal shapes on every rank; the last batch of an
epoch or an uneven data shard breaks that. These helpers pad to the largest local batch,
gather, and cut the padding off again. The backward of the embedding gather sums the
gradient of each rank's rows over all ranks (each rank's logits contribute to every row of
the global batch) and hands every rank the sum for its own rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from partialfc import dist as pdist


def gather_sizes(local: torch.Tensor, group) -> list[list[int]]:
    """All-gather a small int64 vector per rank (e.g. batch size, width, flags)."""
    world = pdist.get_world_size(group)
    if world == 1:
        return [local.tolist()]
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).tolist()  # one device->host copy for all ranks


def _padded_gather(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    max_n = max(sizes)
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous(), group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _padded_gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        max_n = max(sizes)
        padded = grad.new_zeros((len(sizes), max_n, *grad.shape[1:]))
        for r, piece in enumerate(torch.split(grad, sizes, dim=0)):
            padded[r, : sizes[r]] = piece
        if pdist.backend_of(group) == "nccl":
            own = grad.new_empty((max_n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(own, padded.reshape(-1, *grad.shape[1:]), group=group)
        else:  # gloo has no reduce-scatter: sum everything, keep our block
            dist.all_reduce(padded, group=group)
            own = padded[rank]
        return own[: sizes[rank]], None, None, None


def gather_rows(x: torch.Tensor, sizes: list[int], group, differentiable: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` (shapes ``(sizes[r], ...)``) in rank order.

    With ``differentiable`` the gradient w.r.t. the result is summed over ranks and each rank
    receives the part belonging to its own rows."""
    if len(sizes) == 1:
        return x
    if differentiable and x.requires_grad:
        return _GatherRows.apply(x, sizes, pdist.get_rank(group), group)
    return _padded_gather(x, sizes, group)


def all_reduce(x: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    """In-place all-reduce that is a no-op for a single process."""
    if pdist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
