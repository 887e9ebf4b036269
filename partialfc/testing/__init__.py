"""Helpers for tests and benchmarks that need several real processes."""

from partialfc.dist import free_port
from partialfc.testing.multiprocess import run_distributed

__all__ = ["free_port", "run_distributed"]
