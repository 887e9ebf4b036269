"""Sharded classifier: sharding, sampling, collectives, objectives, sparse-row optimizers."""

from partialfc.head.optim import SparseRowAdamW, SparseRowSGD
from partialfc.head.partial_fc import InputError, PartialFC
from partialfc.head.sampler import CentreSampler
from partialfc.head.sharding import shard_range

__all__ = ["PartialFC", "InputError", "CentreSampler", "shard_range", "SparseRowSGD", "SparseRowAdamW"]
