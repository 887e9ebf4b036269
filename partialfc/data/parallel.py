"""Ordered parallel map with a progress bar, for the encode/decode-bound data tools."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], total: int, workers: int | None = None,
                desc: str = "", unit: str = "it", progress: bool = True, chunksize: int = 4,
                start_method: str = "fork") -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes (in-process when 1), results in input order,
    streaming (memory stays bounded by the pool's queue), with a tqdm bar of ``total`` steps.
    ``fn`` must be a module-level function; ``start_method="spawn"`` for work that runs torch
    (a forked child inherits the parent's OpenMP state)."""
    workers = default_workers() if workers is None else workers
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, mininterval=0.5)
    with bar:
        if workers <= 1:
            for result in map(fn, items):
                bar.update()
                yield result
            return
        with mp.get_context(start_method).Pool(workers) as pool:
            for result in pool.imap(fn, items, chunksize=chunksize):
                bar.update()
                yield result
