"""Where each row's target sits among the columns a rank holds, worked out once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """The targets of ``B`` rows among the ``k`` columns (class centres) of one rank.

    - ``col (B,)`` int: the column of row ``i``'s target on this rank, ``-1`` when the target
      lives on another rank (on a single process owning every class: the labels);
    - ``rows (n,)``: rows in increasing order, every row whose target is local among them;
    - ``cols (n,)``: their target columns (``col[rows]``, clamped into ``[0, k)``);
    - ``local (n,)`` bool: whether entry ``j``'s target is on this rank; ``None``: all are;
    - ``columns (k,)`` bool: the columns that take part in every row; ``None``: all do (a
      bounded head's sample is padded to a static size, and its padding columns do not).

    Every per-target tensor that travels with it (the target cosines, the margin-transformed
    ``target_logit``) has shape ``(n,)`` and is aligned with ``rows``: entry ``j`` belongs to
    row ``rows[j]``, column ``cols[j]``. An entry that is not ``local`` holds a finite
    placeholder (the row's cosine with column 0) that :meth:`only_local` and :meth:`put` ignore.
    The shapes depend on ``B`` and ``k`` only, never on the labels' values: nothing here waits
    for the device (a ``nonzero`` would, on CUDA). Build it with :meth:`from_columns`.
    """

    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    local: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    @classmethod
    def from_columns(cls, col: torch.Tensor, width: int, columns: torch.Tensor | None = None) -> Targets:
        """From ``col (B,)`` (target column per row, ``-1`` = not on this rank) among ``width``
        columns (``0``: no row can be local, ``n = 0``), of which ``columns`` take part."""
        if width == 0:
            none = col.new_zeros(0)
            return cls(col, none, none, columns=columns)
        return cls(col, torch.arange(col.shape[0], device=col.device), col.clamp(min=0), col >= 0, columns)

    def drop_columns(self, logits: torch.Tensor, lo: int = 0) -> None:
        """``-inf`` in place in the columns of ``logits (B, w)`` (columns ``[lo, lo + w)``) that
        take no part: ``exp`` makes them 0 in every sum and gradient."""
        if self.columns is not None:
            logits.masked_fill_(~self.columns[lo: lo + logits.shape[1]], float("-inf"))

    def only_local(self, values: torch.Tensor) -> torch.Tensor:
        """``values (n,)`` with the entries that are not local set to 0."""
        return values if self.local is None else torch.where(self.local, values, values.new_zeros(()))

    def put(self, block: torch.Tensor, values: torch.Tensor | float) -> None:
        """``block[rows[j], cols[j]] = values[j]`` (or the number) for the local entries, in place."""
        if self.local is None:
            block[self.rows, self.cols] = values
        else:
            block[self.rows, self.cols] = torch.where(self.local, values, block[self.rows, self.cols])
