"""Sharded classifier: sharding, sampling, sparse-row optimizers (collectives and objectives: ``partialfc.ops``)."""

from partialfc.head.optim import SparseRowAdamW, SparseRowSGD
from partialfc.head.partial_fc import InputError, PartialFC
from partialfc.head.sampler import CentreSampler
from partialfc.head.sharding import shard_range

__all__ = ["PartialFC", "InputError", "CentreSampler", "shard_range", "SparseRowSGD", "SparseRowAdamW"]
