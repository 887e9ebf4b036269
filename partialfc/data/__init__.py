"""Input pipeline: MXNet RecordIO without MXNet, DALI and PyTorch loaders, synthetic datasets.

Heavy optional pieces (DALI) are imported only by the modules that need them.
"""

from partialfc.data.dataset_index import RecordDataset, open_dataset, resolve_paths
from partialfc.data.recordio import RecordIOError, RecordReader, RecordWriter, pack_payload, unpack_payload

__all__ = ["RecordDataset", "RecordIOError", "RecordReader", "RecordWriter", "open_dataset",
           "pack_payload", "resolve_paths", "unpack_payload"]
