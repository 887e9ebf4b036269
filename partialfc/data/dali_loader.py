"""NVIDIA DALI loader: ``fn.readers.mxnet`` -> image decoder (``mixed`` = nvJPEG on the GPU,
``cpu`` without CUDA) -> random flip, optional colour jitter -> normalise, CHW float32.

Sharding is DALI's (``shard_id=rank``, ``num_shards=world_size``, ``pad_last_batch=True``,
shards rotate between epochs), so every rank runs the same number of pipeline iterations. The
padded repeats at the end of a shard are cut off here, and labels are looked up exactly from
each sample's byte offset (DALI's own labels are float32, inexact above 2^24). DALI reads an
index without the header/identity records, written to a temporary directory.

Resumption: ``state_dict()`` carries DALI's pipeline checkpoint; restored with the same
rank layout and batch size it continues exactly. Otherwise the epoch restarts with this rank's
shard and the consumed batches are decoded again and discarded.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Iterator

import numpy as np
import torch

from partialfc import dist
from partialfc.data.dataset_index import RecordDataset, find_corrupt_images
from partialfc.data.images import IMAGE_SIZE
from partialfc.data.loader import EpochLoader, batches_per_epoch, host_to_device, shard_bounds
from partialfc.data.recordio import RecordIOError
from partialfc.seeding import Stream, derive_seed

_READER = "reader"
log = logging.getLogger(__name__)


def _build_pipeline(index_path: str, rec_path: str, batch_size: int, shard: int, num_shards: int,
                    shuffle: bool, flip: bool, augment: bool, seed: int, num_threads: int,
                    device_id: int | None, initial_fill: int, checkpoint: bytes | None):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_checkpointing=True)
    def pipeline():
        jpegs, _ = fn.readers.mxnet(path=[rec_path], index_path=[index_path], shard_id=shard,
                                    num_shards=num_shards, random_shuffle=shuffle, initial_fill=initial_fill,
                                    pad_last_batch=True, stick_to_shard=False, name=_READER)
        source = fn.get_property(jpegs, key="source_info")
        images = fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed",
                                   output_type=types.RGB)
        if augment:
            images = fn.color_twist(images, brightness=fn.random.uniform(range=(0.8, 1.2)),
                                    contrast=fn.random.uniform(range=(0.8, 1.2)),
                                    saturation=fn.random.uniform(range=(0.8, 1.2)))
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[127.5] * 3, std=[127.5] * 3,
                                          mirror=fn.random.coin_flip(probability=0.5) if flip else 0)
        return images, source

    pipe = pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()
    pipe.build()
    return pipe


def _offsets_of(source_info) -> np.ndarray:
    """Byte offsets from DALI's per-sample ``source_info`` strings ("<file> at index <offset>")."""
    return np.array([int(bytes(np.array(s)).decode().rsplit(" ", 1)[1]) for s in source_info], dtype=np.int64)


class DaliLoader(EpochLoader):
    """DALI loader with the contract of :mod:`partialfc.data.loader`.

    ``device``: ``cuda[:i]`` decodes with nvJPEG on that GPU; ``cpu`` (default without CUDA)
    runs the CPU pipeline (``device_id=None``). ``augment`` adds brightness/contrast/saturation
    jitter. ``initial_fill`` is DALI's shuffle buffer: DALI shuffles only locally, so shuffle
    identity-sorted files first (``partialfc data shuffle``).
    """

    def __init__(self, dataset: RecordDataset | str, batch_size: int, rank: int | None = None,
                 world_size: int | None = None, device: torch.device | str | None = None,
                 shuffle: bool = True, flip: bool = True, augment: bool = False, drop_last: bool = True,
                 seed: int = 0, num_threads: int = 2, initial_fill: int = 4096, on_error: str = "raise",
                 verify_images: bool = False, on_bad_image: str = "error", bad_image_budget: int = 100):
        super().__init__(dataset, batch_size, rank, world_size, drop_last, device, seed, on_error, verify_images,
                         on_bad_image, bad_image_budget)
        if on_bad_image == "skip":  # DALI cannot replace one sample: decode everything once, leave bad ones out
            bad = find_corrupt_images(self.dataset, progress=dist.get_rank() == 0)
            self.bad_records.update(bad)
            self._check_budget()
            if bad:
                log.warning("%s: %d bad image(s) left out of the DALI pipeline (records %s)", self.dataset.rec_path,
                            len(bad), ", ".join(str(k) for k, _ in bad))
                self.dataset = self.dataset.select(~np.isin(self.dataset.keys, [k for k, _ in bad]), bad)
        self.shuffle, self.flip, self.augment = shuffle, flip, augment
        self.num_threads, self.initial_fill = num_threads, initial_fill
        self._tmp = tempfile.TemporaryDirectory(prefix="partialfc-dali-")
        self.index_path = self.dataset.write_dali_index(f"{self._tmp.name}/images.idx")
        self._sorted = np.argsort(self.dataset.offsets, kind="stable")
        self._sorted_offsets = self.dataset.offsets[self._sorted]
        # DALI pads every shard to the longest: its iterations per epoch are those of drop_last=False
        self._runs_per_epoch = batches_per_epoch(self.dataset.num_images, self.world_size, batch_size, False)
        self._pipe = None
        self._pipe_epoch = 0  # epoch at which the pipeline was built (its shard = rank + that)
        self._runs_done = 0  # pipeline iterations done in the current epoch
        self._checkpoint: bytes | None = None

    def _device_id(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _ensure_pipeline(self, epoch: int, start: int) -> None:
        if self._pipe is not None:
            return
        restoring = self._checkpoint is not None
        built_at = self._pipe_epoch if restoring else epoch  # a checkpoint needs its original pipeline
        self._pipe = _build_pipeline(self.index_path, self.dataset.rec_path, self.batch_size,
                                     (self.rank + built_at) % self.world_size, self.world_size, self.shuffle,
                                     self.flip, self.augment, derive_seed(self.seed, Stream.DALI, built_at),
                                     self.num_threads, self._device_id(), self.initial_fill, self._checkpoint)
        self._pipe_epoch, self._checkpoint = built_at, None
        self._runs_done = start if restoring else 0
        while self._runs_done < start:  # no usable checkpoint: decode and discard
            self._run(epoch)

    def _run(self, epoch: int):
        try:
            outputs = self._pipe.run()
        except RuntimeError as e:
            raise self._decode_error(epoch, e) from e
        self._runs_done += 1
        return outputs

    def _decode_error(self, epoch: int, error: Exception) -> RecordIOError:
        bad = find_corrupt_images(self.dataset, progress=False)
        listing = "; ".join(reason for _, reason in bad[:10]) or f"DALI said: {str(error).splitlines()[0]}"
        return RecordIOError(f"{self.dataset.rec_path}: DALI failed in epoch {epoch}: {listing}; set "
                             f"data.on_bad_image=skip to leave bad images out")

    def _to_torch(self, tensor_list, where: str) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        if not tensor_list.is_dense_tensor():
            raise RecordIOError(f"{self.dataset.rec_path}: {where}: images of different sizes in one batch; "
                                f"expected {IMAGE_SIZE}x{IMAGE_SIZE} aligned face crops")
        tensor = tensor_list.as_tensor()
        if tuple(tensor.shape()[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise RecordIOError(f"{self.dataset.rec_path}: {where}: images are {tensor.shape()[1:]}, expected "
                                f"(3, {IMAGE_SIZE}, {IMAGE_SIZE})")
        out = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, out, cuda_stream=stream)
        return out

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._ensure_pipeline(epoch, start)
        # shard_id = rank at the build epoch, and DALI moves to the next shard every epoch
        lo, hi = shard_bounds(self.dataset.num_images, self.world_size, (self.rank + epoch) % self.world_size)
        for b in range(start, len(self)):
            images, source = self._run(epoch)
            real = max(0, min(self.batch_size, hi - lo - b * self.batch_size))
            offsets = _offsets_of(source)[:real]
            labels = self.dataset.labels[self._sorted[np.searchsorted(self._sorted_offsets, offsets)]]
            yield (self._to_torch(images, f"epoch {epoch} batch {b}")[:real],
                   host_to_device(torch.from_numpy(labels), self.device))
        while self._runs_done < self._runs_per_epoch:  # drop_last: finish DALI's epoch
            self._run(epoch)
        self._runs_done = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._pipe is not None:
            state["dali_checkpoint"] = self._pipe.checkpoint()
            state["dali_pipeline_epoch"] = self._pipe_epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        same_layout = all(state.get(k) == getattr(self, k) for k in ("world_size", "rank", "batch_size", "seed"))
        self._pipe = None
        self._checkpoint = state.get("dali_checkpoint") if same_layout else None
        if self._checkpoint is not None:
            self._pipe_epoch = int(state["dali_pipeline_epoch"])
