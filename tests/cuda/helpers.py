"""What every test of the CUDA tier shares: its marks, the head variants, a sync counter.

The tier runs with ``pytest -m cuda`` (``bash launch/gpu_check.sh`` runs it first) and is
skipped where ``torch.cuda.is_available()`` is False; it is never ``required``."""

from __future__ import annotations

import importlib.util
import inspect
import warnings

import pytest
import torch

from partialfc import PartialFC
from partialfc.ops.implementation import Implementation

CUDA_TIER = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Every explicit path of the head's fused= switch ("auto" picks one of them). Read directly:
# a package without the enum, or a head without the switch, fails the tier (at collection or
# in head_variants), it does not skip.
FUSED_VALUES = [c for c in Implementation if c is not Implementation.auto]
NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def head_variants() -> list:
    """``pytest.param(kwargs of PartialFC)`` for each path of the head."""
    fused = inspect.signature(PartialFC).parameters.get("fused")
    assert fused is not None, "PartialFC lost its fused= switch"
    assert isinstance(fused.default, Implementation), f"PartialFC(fused=) defaults to {fused.default!r}"
    return [pytest.param({"fused": value}, id=f"fused_{value}",
                         marks=[NO_TRITON] if value is Implementation.triton else [])
            for value in FUSED_VALUES]


def count_syncs(fn) -> list[str]:
    """Run ``fn()`` with ``torch.cuda.set_sync_debug_mode("warn")``; return ``file:line`` of
    the Python caller of each host synchronisation it made (device->host copies, blocking
    host->device copies, ``nonzero``, ``unique``, ``item``, stream waits)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
