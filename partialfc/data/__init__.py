"""Input pipeline: MXNet RecordIO without MXNet, DALI and PyTorch loaders, synthetic datasets.

DALI is imported only when a DALI pipeline is built.
"""

from partialfc.data.dali_loader import DaliLoader
from partialfc.data.dataset_index import RecordDataset, open_dataset, resolve_paths
from partialfc.data.recordio import RecordIOError, RecordReader, RecordWriter, pack_payload, unpack_payload
from partialfc.data.synthetic import SyntheticDataset, write_synthetic_dataset
from partialfc.data.torch_loader import TorchLoader
from partialfc.data.verification_bin import load_bin_images, read_bin, write_bin

__all__ = ["DaliLoader", "RecordDataset", "RecordIOError", "RecordReader", "RecordWriter", "SyntheticDataset",
           "TorchLoader", "load_bin_images", "open_dataset", "pack_payload", "read_bin", "resolve_paths",
           "unpack_payload", "write_bin", "write_synthetic_dataset"]
