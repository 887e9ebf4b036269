"""partialfc: sharded Partial FC classifier and margin-softmax losses for face recognition."""

from partialfc.errors import (CheckpointError, ConfigError, ExportError, InputError, InputNotFoundError,
                              LaunchError, PartialFCError, RecordIOError, TrainingDiverged, VerificationBinError)
from partialfc.head import PartialFC, SparseRowAdamW, SparseRowSGD
from partialfc.head.data_parallel import scale_for_data_parallel

__version__ = "0.1.0"
__all__ = ["PartialFC", "SparseRowSGD", "SparseRowAdamW", "scale_for_data_parallel", "PartialFCError", "InputError", "ConfigError",
           "CheckpointError", "LaunchError", "RecordIOError", "VerificationBinError", "InputNotFoundError",
           "ExportError", "TrainingDiverged", "__version__"]
