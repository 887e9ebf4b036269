"""partialfc: sharded Partial FC classifier and margin-softmax losses for face recognition."""

from partialfc.errors import (CheckpointError, ConfigError, ExportError, InputError, InputNotFoundError,
                              LaunchError, PartialFCError, RecordIOError, TrainingDiverged, VerificationBinError)
from partialfc.head import PartialFC, SparseRowAdamW, SparseRowSGD

__version__ = "0.1.0"
__all__ = ["PartialFC", "SparseRowSGD", "SparseRowAdamW", "PartialFCError", "InputError", "ConfigError",
           "CheckpointError", "LaunchError", "RecordIOError", "VerificationBinError", "InputNotFoundError",
           "ExportError", "TrainingDiverged", "__version__"]
