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

Two implementations of the chunk walk share everything else: ``Implementation.torch`` (a
PyTorch loop, any device) and ``Implementation.triton`` (:mod:`partialfc.ops.triton_fused`,
CUDA, or CPU tensors under ``TRITON_INTERPRET=1``). Matmuls run in the autocast dtype when autocast is on at the call
(or in the inputs' dtype), everything after them in fp32 (fp64 stays fp64).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from partialfc.ops import torch_fused
from partialfc.ops.chunking import ChunkProblem, centre_inverse_norms
from partialfc.ops.collectives import all_reduce
from partialfc.ops.implementation import Implementation
from partialfc.ops.objectives import RowObjective, sum_statistics
from partialfc.ops.targets import Targets

DEFAULT_CHUNK = 8192  # centres per chunk: B x 8192 fp32 logits (16 MB at B = 512)


def _backend(implementation: Implementation):
    """The module with ``row_stats`` and ``gradients`` for ``implementation`` (a chunk walk)."""
    if implementation is Implementation.triton:
        from partialfc.ops import triton_fused  # optional dependency, imported on use

        return triton_fused
    return torch_fused


class _FusedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, centres, inv_norm, target_logit, target_slope, targets: Targets,
                objective: RowObjective, problem: ChunkProblem, group, implementation: Implementation):
        m, s = _backend(implementation).row_stats(emb, centres, inv_norm, targets, target_logit, problem)
        row_max = all_reduce(m.clone(), dist.ReduceOp.MAX, group)
        sum_exp, target = sum_statistics(s * torch.exp(m - row_max), targets, target_logit, group)
        loss, weight, target_pull = objective.combine(row_max, sum_exp, target)
        target_pull = targets.only_local(target_pull[targets.rows])
        ctx.save_for_backward(emb, centres, inv_norm, row_max, weight, target_pull, target_logit, target_slope)
        ctx.targets, ctx.problem, ctx.implementation = targets, problem, implementation
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        emb, centres, inv_norm, row_max, weight, target_pull, target_logit, target_slope = ctx.saved_tensors
        targets = ctx.targets
        grad_rows = grad_rows.to(weight.dtype)
        target_grad = target_pull * grad_rows[targets.rows] * target_slope
        grad_e, grad_w = _backend(ctx.implementation).gradients(emb, centres, inv_norm, targets, target_logit,
                                                                row_max, weight * grad_rows, target_grad,
                                                                ctx.problem, need_w=ctx.needs_input_grad[1])
        return grad_e, grad_w, None, None, None, None, None, None, None, None


def fused_margin_softmax(embeddings: torch.Tensor, centres: torch.Tensor, targets: Targets, group=None, *,
                         target_logit: Callable[[torch.Tensor], torch.Tensor],
                         objective: RowObjective = RowObjective(), scale: float = 1.0,
                         inter_threshold: float | None = None,
                         implementation: Implementation | str = Implementation.torch,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Per-row losses ``(B,)`` of ``objective`` over ``z_j = scale * c_j`` (``c = clamp(E @
    normalize(W).T, -1, 1)``, non-target ``c_j > inter_threshold`` set to 0) with
    ``target_logit(c_y)`` (``(n,) -> (n,)``, aligned with ``targets.rows``) at the targets.

    ``embeddings (B, D)``: already normalised (their normalisation stays in autograd);
    ``centres (k, D)``: raw, this rank's columns (``k`` may be 0); ``chunk_size``: centres
    per chunk (``None``: :data:`DEFAULT_CHUNK`); ``implementation``: ``torch`` or ``triton``
    (a member of :class:`~partialfc.ops.implementation.Implementation` or its name). Identical
    on every rank of ``group``; gradients flow to both inputs."""
    implementation = Implementation.parse(implementation, "fused implementation",
                                          (Implementation.torch, Implementation.triton))
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1 centre, got {chunk_size}")
    device_type = embeddings.device.type
    compute = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
               else torch.promote_types(embeddings.dtype, centres.dtype))
    accumulate = torch.promote_types(torch.promote_types(embeddings.dtype, centres.dtype), torch.float32)
    problem = ChunkProblem(float(scale), inter_threshold, objective.dissected, chunk, compute)
    rows, cols = targets.rows, targets.cols
    with torch.no_grad():
        inv_norm = centre_inverse_norms(centres, problem.chunk_size, accumulate)
        cos_y = (embeddings[rows].to(accumulate) * centres[cols].to(accumulate)).sum(dim=1)
        cos_y = cos_y.mul_(inv_norm[cols]).clamp_(-1.0, 1.0)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled():  # psi's slope by autograd on a detached leaf: both gradient modes
            cos_y.requires_grad_(True)
            logit = target_logit(cos_y)
            slope, = torch.autograd.grad(logit.sum(), cos_y)
        else:  # no_grad / inference_mode: no backward will read the slope
            logit = target_logit(cos_y)
            slope = torch.zeros_like(logit)
        return _FusedRows.apply(embeddings, centres, inv_norm, logit.detach(), slope, targets, objective,
                                problem, group, implementation)
