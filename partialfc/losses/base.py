"""The common shape of every loss: a transform of the target logit plus an objective.

A loss sees the clamped cosines ``cos`` of shape ``(B, k)`` between the (global) batch of
embeddings and the ``k`` class centres a rank holds, and the :class:`~partialfc.ops.Targets`
of those rows (which rows have their target on this rank, in which column; built once by
the head). It returns per-row losses ``(B,)``; the objective performs the cross-rank
reductions, so the same loss works on one process and on a sharded head.
"""

from __future__ import annotations

import torch
from torch import nn

from partialfc.ops.fused import fused_margin_softmax
from partialfc.ops.implementation import Implementation
from partialfc.ops.objectives import RowObjective
from partialfc.ops.targets import Targets

GRADIENT_MODES = ("exact", "straight_through")
EXACT_CLAMP = 1.0 - 1e-7


class MarginLoss(nn.Module):
    """Base class: ``z_j = s * c_j`` for non-targets, ``z_y = s * psi(c_y)`` for the target.

    Subclasses implement :meth:`psi` (on target cosines, shape ``(n,)``) and may override
    :meth:`row_objective` (read by both the plain and the fused path; :meth:`objective` is the
    plain path's call of it and is not used by :meth:`fused`). ``gradient="straight_through"``
    keeps the forward of ``psi`` but back-propagates as if ``psi(c) = c``; ``None`` takes the
    class's ``default_gradient`` (the setting behind its paper's published numbers).
    ``inter_threshold`` (inter-class filtering for noisy data) sets non-target cosines above
    it to 0 before the margin, in every row (the target entry is never filtered), so the
    result does not depend on how the classes are sharded.
    """

    default_gradient = "exact"

    def __init__(self, s: float = 64.0, gradient: str | None = None,
                 inter_threshold: float | None = None):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        gradient = gradient or self.default_gradient
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if inter_threshold is not None and not -1.0 <= inter_threshold <= 1.0:
            raise ValueError(f"inter_threshold must lie in [-1, 1], got {inter_threshold}")
        self.s = float(s)
        self.gradient = gradient
        self.inter_threshold = inter_threshold

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Margin function on target cosines; identity for NormFace."""
        return cos_target

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """``s * psi(c_y)`` with the configured gradient mode, shape ``(n,)``."""
        if self.gradient == "straight_through":
            with torch.no_grad():
                shift = self.s * self.psi(cos_target) - self.s * cos_target
            return self.s * cos_target + shift
        return self.s * self.psi(cos_target)

    def row_objective(self) -> RowObjective:
        """The objective over the row of logits; softmax cross-entropy here."""
        return RowObjective()

    def objective(self, cos: torch.Tensor, targets: Targets, target_logit: torch.Tensor,
                  group) -> torch.Tensor:
        """Per-row objective over the (possibly sharded) row of ``z = s * cos`` with
        ``target_logit`` (aligned with ``targets.rows``) at the targets."""
        return self.row_objective()(cos, targets, group, scale=self.s, target_logit=target_logit)

    def filter_inter_class(self, cos: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Inter-class filtering: non-target cosines above ``inter_threshold`` become 0."""
        keep_target = torch.zeros_like(cos, dtype=torch.bool)
        targets.put(keep_target, True)
        return torch.where((cos > self.inter_threshold) & ~keep_target, torch.zeros_like(cos), cos)

    def forward(self, cos: torch.Tensor, targets: Targets, group=None) -> torch.Tensor:
        """Per-row losses ``(B,)``. On a single process build ``targets`` from the labels:
        ``Targets.from_columns(labels, cos.shape[1])``.

        ``cos`` may be half precision (an autocast matmul): the margin and everything after
        it run in fp32; the gradient comes back in the dtype of ``cos``."""
        if self.inter_threshold is not None:  # compare in fp32: a bf16 threshold would round
            cos = self.filter_inter_class(cos.to(torch.promote_types(cos.dtype, torch.float32)), targets)
        cos_target = cos[targets.rows, targets.cols].to(torch.promote_types(cos.dtype, torch.float32))
        return self.objective(cos, targets, self.target_logit(cos_target), group)

    def fused(self, embeddings: torch.Tensor, centres: torch.Tensor, targets: Targets, group=None, *,
              implementation: Implementation | str = Implementation.torch,
              chunk_size: int | None = None) -> torch.Tensor:
        """Per-row losses ``(B,)`` from the normalised embeddings ``(B, D)`` and the raw
        (unnormalised) class centres ``(k, D)``, equal to :meth:`forward` on their clamped
        cosines but never holding the ``(B, k)`` logits: see
        :func:`partialfc.ops.fused.fused_margin_softmax` (``implementation``: ``torch`` or
        ``triton``)."""
        return fused_margin_softmax(embeddings, centres, targets, group, target_logit=self.target_logit,
                                    objective=self.row_objective(), scale=self.s,
                                    inter_threshold=self.inter_threshold, implementation=implementation,
                                    chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return f"s={self.s}, gradient={self.gradient}, inter_threshold={self.inter_threshold}"


def safe_arccos(cos: torch.Tensor) -> torch.Tensor:
    """``arccos`` on cosines clamped to ``[-1+1e-7, 1-1e-7]`` (finite derivative)."""
    return torch.arccos(cos.clamp(-EXACT_CLAMP, EXACT_CLAMP))
