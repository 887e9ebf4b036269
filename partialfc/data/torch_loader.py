"""PyTorch ``DataLoader`` over RecordIO, for machines without DALI.

Each epoch draws a global permutation from ``(seed, epoch)`` (same on every rank, so no
communication), cuts it into DALI-style shards and decodes with Pillow in worker processes.
Flips are drawn with the permutation, so a position ``(epoch, batch)`` fully determines the
following batches, whatever the number of workers.

Workers ignore SIGTERM and SIGINT: a scheduler signals every process of a job step, and the
rank must outlive its workers long enough to checkpoint; :meth:`TorchLoader.close` (the
trainer calls it on every exit path) shuts them down. Because torch's own shutdown falls back
on SIGTERM for a worker that is still busy, every worker this module starts is also killed
(SIGKILL) where that fallback would have been needed: after :meth:`close` and at interpreter
exit, before multiprocessing's exit hook would wait on it forever. Their
seeds come from the loader's own generator (stream ``data.workers``), never from torch's
global one, so creating the workers does not shift the rank's dropout stream.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from partialfc.data.dataset_index import RecordDataset
from partialfc.data.images import IMAGE_SIZE, decode_face
from partialfc.data.loader import EpochLoader, host_to_device, normalise, shard_bounds
from partialfc.data.recordio import RecordIOError, unpack_payload
from partialfc.seeding import Stream, seeded_generator

Bad = list[tuple[int, str]]  # (key, reason) of records that could not be used


class RecordImages(Dataset):
    """Item ``(index, flip)`` -> (uint8 ``(3, 112, 112)`` RGB array or None, exact int label,
    bad records met). A record that cannot be read or decoded is reported, not raised (raised in
    a worker it would reach the trainer as a multi-line traceback); with ``skip`` the next
    decodable record in index order (wrapping around) takes its place, whatever the workers."""

    def __init__(self, dataset: RecordDataset, skip: bool = False):
        self.dataset, self.skip = dataset, skip
        self.reader = dataset.reader()

    def __len__(self) -> int:
        return self.dataset.num_images

    def _image(self, index: int) -> np.ndarray:
        key, offset = int(self.dataset.keys[index]), int(self.dataset.offsets[index])
        payload, _ = self.reader.read_at(offset, key)
        return decode_face(unpack_payload(payload)[2], f"{self.dataset.rec_path}: record {key}")

    def __getitem__(self, item: tuple[int, bool]) -> tuple[np.ndarray | None, int, Bad]:
        index, flip = item
        bad: Bad = []
        for j in range(index, index + len(self)):
            j %= len(self)
            try:
                image = self._image(j)
            except RecordIOError as e:
                bad.append((int(self.dataset.keys[j]), str(e)))
                if self.skip:
                    continue
                break
            if flip:
                image = image[:, ::-1]
            return image.transpose(2, 0, 1), int(self.dataset.labels[j]), bad
        return None, -1, bad


def collate(items: list[tuple[np.ndarray | None, int, Bad]]) -> tuple[torch.Tensor | None, torch.Tensor, Bad]:
    """uint8 ``(N, 3, 112, 112)`` (None if some item has no image), int64 ``(N,)`` and the bad
    records met (numpy stacking: torch.stack of uint8 is slow)."""
    if not items:
        return (torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                [])
    images, labels, bad = zip(*items)
    stacked = None if any(i is None for i in images) else torch.from_numpy(np.stack(images))
    return stacked, torch.tensor(labels, dtype=torch.int64), [b for item in bad for b in item]


class EpochBatchSampler:
    """Batches of ``(index, flip)`` for this rank in one epoch, from batch ``start`` on."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader
        self.epoch = self.start = 0

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        lo = self.loader
        n = lo.dataset.num_images
        rng = np.random.default_rng([lo.seed, self.epoch])
        order = rng.permutation(n) if lo.shuffle else np.arange(n)
        flips = (rng.random(n) < 0.5) if lo.flip else np.zeros(n, dtype=bool)
        begin, end = shard_bounds(n, lo.world_size, lo.rank)
        for b in range(self.start, len(lo)):
            idx = range(begin + b * lo.batch_size, min(begin + (b + 1) * lo.batch_size, end))
            yield [(int(order[i]), bool(flips[i])) for i in idx]

    def __len__(self) -> int:
        return len(self.loader) - self.start


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: leave SIGTERM/SIGINT to the rank, which stops at a step boundary."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_WORKERS: weakref.WeakSet = weakref.WeakSet()  # every worker process started by a TorchLoader


def _kill_workers(workers) -> None:
    """SIGKILL and reap the workers still alive (they ignore SIGTERM)."""
    for worker in list(workers):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)


# registered after multiprocessing's exit hook (imported by torch), so it runs before it
atexit.register(_kill_workers, _WORKERS)


class TorchLoader(EpochLoader):
    """Multi-process PyTorch loader with the contract of :mod:`partialfc.data.loader`.

    ``dataset``: a path (``.rec``/``.idx``/prefix) or an opened :class:`RecordDataset`.
    ``rank``/``world_size`` default to the process group (single process if none).
    """

    def __init__(self, dataset: RecordDataset | str, batch_size: int, rank: int | None = None,
                 world_size: int | None = None, device: torch.device | str | None = None,
                 shuffle: bool = True, flip: bool = True, drop_last: bool = True, seed: int = 0,
                 num_workers: int = 2, on_error: str = "raise", verify_images: bool = False,
                 on_bad_image: str = "error", bad_image_budget: int = 100):
        super().__init__(dataset, batch_size, rank, world_size, drop_last, device, seed, on_error, verify_images,
                         on_bad_image, bad_image_budget)
        self.shuffle, self.flip = shuffle, flip
        self.sampler = EpochBatchSampler(self)
        self.loader = DataLoader(RecordImages(self.dataset, on_bad_image == "skip"), batch_sampler=self.sampler,
                                 num_workers=num_workers,
                                 collate_fn=collate, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
                                 generator=seeded_generator(seed, Stream.DATA_WORKERS, self.rank))

    def close(self) -> None:
        """Shut the worker processes down (they ignore SIGTERM); the next epoch starts new ones."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            _kill_workers(iterator._workers)

    def _batches(self, epoch: int, start: int):
        self.sampler.epoch, self.sampler.start = epoch, start
        batches = iter(self.loader)
        _WORKERS.update(getattr(batches, "_workers", ()))
        for images, labels, bad in batches:
            self._note_bad(bad)
            if images is None:
                raise RecordIOError(f"{self.dataset.rec_path}: no record decodes as a training image")
            yield normalise(host_to_device(images, self.device)), host_to_device(labels, self.device)
