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

CUDA_TIER = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# The parametrization point for the fused chunked objective (issue 12): PartialFC's switch
# and the values tried. Until the switch exists only the default path runs.
FUSED_SWITCH = "fused"
FUSED_VALUES = {"unfused": "off", "fused_torch": "torch", "fused_triton": "triton"}
NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def head_variants() -> list:
    """``pytest.param(kwargs of PartialFC)`` for each path of the head; the fused ones are
    skipped (with a reason) where PartialFC has no fused switch."""
    has_switch = FUSED_SWITCH in inspect.signature(PartialFC).parameters
    if not has_switch:
        return [pytest.param({}, id="default"),
                *[pytest.param({}, id=name, marks=pytest.mark.skip(reason=f"PartialFC has no {FUSED_SWITCH}= switch"))
                  for name in FUSED_VALUES if name != "unfused"]]
    return [pytest.param({FUSED_SWITCH: value}, id=name, marks=[NO_TRITON] if value == "triton" else [])
            for name, value in FUSED_VALUES.items()]


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
