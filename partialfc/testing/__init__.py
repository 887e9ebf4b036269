"""Helpers for tests and benchmarks that need several real processes."""

from partialfc.dist import free_port
from partialfc.testing.multiprocess import run_distributed
from partialfc.testing.ports import reserved_port

__all__ = ["free_port", "reserved_port", "run_distributed"]
