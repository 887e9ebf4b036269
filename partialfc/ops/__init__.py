"""Ground floor of the head and the losses: autograd collectives and the fused row objectives.

Imports nothing from ``partialfc.head`` or ``partialfc.losses``; both build on it."""

from partialfc.ops.collectives import all_reduce, gather_rows, gather_sizes
from partialfc.ops.objectives import dissected_softmax, softmax_cross_entropy
from partialfc.ops.targets import Targets

__all__ = ["all_reduce", "gather_rows", "gather_sizes", "dissected_softmax", "softmax_cross_entropy", "Targets"]
