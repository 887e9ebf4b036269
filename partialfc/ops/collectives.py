"""Every collective of the package, in one place.

NCCL takes only tensors on the group's GPU ("No backend type associated with device type
cpu" otherwise); gloo takes host tensors. Each function here hands the backend its tensors on
:func:`group_device` and gives the results back on the caller's tensor's device, so a caller
may pass a host flag to an NCCL group or a GPU tensor to a gloo group. No other module calls
a ``torch.distributed`` collective (``tests/test_architecture.py`` checks it).

A group of one process skips the communication, unless ``$PARTIALFC_ALWAYS_COMMUNICATE=1``
(:data:`ALWAYS_COMMUNICATE`): then a world of one runs every collective, which is how the
tests run the multi-rank code paths on one device.

The row gathers are autograd-aware for tensors whose first dimension differs across ranks
(``all_gather`` needs equal shapes; the last batch of an epoch or an uneven shard breaks
that): pad to the largest local batch, gather, cut the padding off. The backward of the
embedding gather sums the gradient of each rank's rows over all ranks (each rank's logits
contribute to every row of the global batch) and hands every rank the sum for its own rows.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from partialfc import dist as pdist

ALWAYS_COMMUNICATE = "PARTIALFC_ALWAYS_COMMUNICATE"
ReduceOp = dist.ReduceOp


def communicates(group=None) -> bool:
    """Whether a collective over ``group`` talks to the backend: a process group exists and
    has more than one rank, or :data:`ALWAYS_COMMUNICATE` is set."""
    if not pdist.is_initialized():
        return False
    return pdist.get_world_size(group) > 1 or os.environ.get(ALWAYS_COMMUNICATE) == "1"


def group_device(group=None) -> torch.device:
    """The device the backend of ``group`` takes tensors on: the current CUDA device for a
    group with NCCL, else the CPU."""
    if "nccl" in pdist.backend_of(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _staged(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` contiguous on the group's device (``x`` itself when it already is)."""
    return x.to(group_device(group)).contiguous()


def _in_place(collective, x: torch.Tensor, group, **kw) -> torch.Tensor:
    """Run ``collective(tensor, group=group, **kw)`` on ``x`` staged on the group's device,
    then write the result back into ``x``; returns ``x``."""
    if communicates(group):
        staged = _staged(x, group)
        collective(staged, group=group, **kw)
        if staged is not x:
            x.copy_(staged)
    return x


def all_reduce(x: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of ``x`` (any device); returns ``x``."""
    return _in_place(dist.all_reduce, x, group, op=op)


def all_gather(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), in rank order, on ``x``'s device."""
    if not communicates(group):
        return [x]
    staged = _staged(x, group)
    out = [torch.empty_like(staged) for _ in range(pdist.get_world_size(group))]
    dist.all_gather(out, staged, group=group)
    return [t.to(x.device) for t in out]


def broadcast(x: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast of world rank ``src``'s ``x`` to every rank; returns ``x``."""
    return _in_place(dist.broadcast, x, group, src=src)


def broadcast_object(obj, src: int, group=None):
    """World rank ``src``'s picklable ``obj`` on every rank (the others pass anything)."""
    if not communicates(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=group_device(group))
    return box[0]


def barrier(group=None) -> None:
    """Wait until every rank of ``group`` got here (nothing without a process group)."""
    if communicates(group):
        all_reduce(torch.zeros(1), group=group)  # a tensor barrier: on the group's device for NCCL too


def all_true(ok: bool, group=None) -> bool:
    """Collective: True on every rank iff ``ok`` on every rank (a barrier carrying a verdict)."""
    return bool(all_reduce(torch.tensor([1.0 if ok else 0.0]), ReduceOp.MIN, group).item())


def gather_sizes(local: torch.Tensor, group=None) -> list[list[int]]:
    """All-gather a small int64 vector per rank (e.g. batch size, width, flags)."""
    return torch.stack(all_gather(local, group)).tolist()  # one device->host copy for all ranks


def _padded_gather(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    return torch.cat([c[:n] for c, n in zip(all_gather(padded, group), sizes)], dim=0)


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
        if "nccl" in pdist.backend_of(group):
            staged = _staged(padded, group).reshape(-1, *grad.shape[1:])
            own = staged.new_empty((max_n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(own, staged, group=group)
            own = own.to(grad.device)
        else:  # gloo has no reduce-scatter: sum everything, keep our block
            own = all_reduce(padded, group=group)[rank]
        return own[: sizes[rank]], None, None, None


def gather_rows(x: torch.Tensor, sizes: list[int], group=None, differentiable: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` (shapes ``(sizes[r], ...)``) in rank order.

    With ``differentiable`` the gradient w.r.t. the result is summed over ranks and each rank
    receives the part belonging to its own rows."""
    if not communicates(group):
        return x
    if differentiable and x.requires_grad:
        return _GatherRows.apply(x, sizes, pdist.get_rank(group), group)
    return _padded_gather(x, sizes, group)
