"""Helpers for tests and benchmarks that need several real processes."""

from partialfc.testing.multiprocess import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
