"""Benchmarks: ``partialfc bench head`` and ``partialfc bench data``."""
