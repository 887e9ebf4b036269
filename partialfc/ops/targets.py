"""Where each row's target sits among the columns a rank holds, worked out once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """The targets of ``B`` rows among the ``k`` columns (class centres) of one rank.

    - ``col (B,)`` int: the column of row ``i``'s target on this rank, ``-1`` when the target
      lives on another rank (on a single process owning every class: the labels);
    - ``rows (n,)``: the rows whose target is local, in increasing order;
    - ``cols (n,)``: their target columns, ``col[rows]``.

    Every per-target tensor that travels with it (the target cosines, the margin-transformed
    ``target_logit``) has shape ``(n,)`` and is aligned with ``rows``: entry ``j`` belongs to
    row ``rows[j]``, column ``cols[j]``. Build it with :meth:`from_columns`.
    """

    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def from_columns(cls, col: torch.Tensor) -> Targets:
        """From ``col (B,)`` (target column per row, ``-1`` = not on this rank)."""
        rows = torch.nonzero(col >= 0, as_tuple=True)[0]
        return cls(col, rows, col[rows])
