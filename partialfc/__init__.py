"""partialfc: sharded Partial FC classifier and margin-softmax losses for face recognition."""

from partialfc.head import InputError, PartialFC, SparseRowAdamW, SparseRowSGD

__version__ = "0.1.0"
__all__ = ["PartialFC", "InputError", "SparseRowSGD", "SparseRowAdamW", "__version__"]
