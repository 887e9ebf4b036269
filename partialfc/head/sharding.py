"""Balanced contiguous split of the classes over the ranks of a group."""

from __future__ import annotations


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Return ``(class_start, num_local)`` for ``rank``: the first ``num_classes % world_size``
    ranks own one class more than the others, blocks are contiguous and in rank order."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    base, extra = divmod(num_classes, world_size)
    num_local = base + (rank < extra)
    start = base * rank + min(rank, extra)
    return start, num_local
