"""What every training loader shares: the output contract, sharding arithmetic, and the
epoch/batch position that makes a run resumable.

Contract: iterating a loader yields one epoch of ``(images, labels)`` batches, ``images``
float32 ``(N, 3, 112, 112)`` normalised as ``(x / 255 - 0.5) / 0.5`` and ``labels`` int64
``(N,)`` (exact class ids), both on the loader's device. Every rank yields the same number of
batches per epoch (``len(loader)``): with ``drop_last=True`` (training) only full batches and
each sample at most once; with ``drop_last=False`` each sample exactly once over all ranks, a
rank's last batch possibly smaller (even empty). Shards follow DALI's split: shard ``s`` of
``S`` holds samples ``[floor(N s / S), floor(N (s+1) / S))`` of the epoch's order.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from partialfc import dist
from partialfc.data.dataset_index import RecordDataset, open_dataset
from partialfc.errors import InputError, RecordIOError

log = logging.getLogger(__name__)
BAD_IMAGE_MODES = ("error", "skip")


def shard_bounds(num_samples: int, num_shards: int, shard: int) -> tuple[int, int]:
    return num_samples * shard // num_shards, num_samples * (shard + 1) // num_shards


def batches_per_epoch(num_samples: int, num_shards: int, batch_size: int, drop_last: bool) -> int:
    """Batches each rank yields per epoch (same on every rank)."""
    if drop_last:
        return (num_samples // num_shards) // batch_size
    return math.ceil(math.ceil(num_samples / num_shards) / batch_size)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` of a batch on ``device``. On a GPU the copy is issued from pinned
    memory with ``non_blocking=True``, so the host goes on queueing work while it runs (from
    pageable memory it would wait for the copy); a tensor already pinned (the torch loader's
    ``pin_memory``) is not copied again on the host."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 ``(x / 255 - 0.5) / 0.5``."""
    return images.float().div_(127.5).sub_(1.0)


class EpochLoader:
    """Base of the loaders: rank layout, the epoch/batch position and its save/restore.

    Subclasses implement ``_batches(epoch, start)`` yielding the batches of ``epoch`` from
    batch index ``start`` on. Breaking out of an epoch and iterating again resumes where it
    stopped; ``state_dict()`` / ``load_state_dict()`` carry the position across runs.

    A record that cannot be read or decoded as a training image: ``on_bad_image="error"``
    stops with a one-line :class:`RecordIOError` naming it; ``"skip"`` replaces it (each
    loader says how), counts it in ``bad_records`` (key -> reason, over the run, kept in the
    state) and logs the count per epoch; more than ``bad_image_budget`` bad records stop the
    run listing them.
    """

    def __init__(self, dataset: RecordDataset | str, batch_size: int, rank: int | None, world_size: int | None,
                 drop_last: bool, device: torch.device | str | None, seed: int,
                 on_error: str = "raise", verify_images: bool = False, on_bad_image: str = "error",
                 bad_image_budget: int = 100):
        if on_bad_image not in BAD_IMAGE_MODES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_MODES}, got {on_bad_image!r}")
        self.on_bad_image, self.bad_image_budget = on_bad_image, bad_image_budget
        self.bad_records: dict[int, str] = {}
        self._bad_in_epoch: set[int] = set()
        self.dataset = dataset if isinstance(dataset, RecordDataset) else open_dataset(
            dataset, on_error=on_error, verify_images=verify_images)
        self.batch_size = batch_size
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.drop_last = drop_last
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.seed = seed
        self.epoch = 0
        self.batches_consumed = 0
        if self.dataset.num_images == 0:
            raise InputError(f"{self.dataset.rec_path}: the dataset holds no images")
        if len(self) == 0:
            raise InputError(f"{self.dataset.rec_path}: {self.dataset.num_images} images give no full batch of "
                             f"{batch_size} on each of {self.world_size} ranks; lower the batch size")

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def num_images(self) -> int:
        return self.dataset.num_images

    def __len__(self) -> int:
        return batches_per_epoch(self.dataset.num_images, self.world_size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._batches(self.epoch, self.batches_consumed):
            self.batches_consumed += 1
            yield batch
        if self._bad_in_epoch:
            log.warning("%s: epoch %d: %d bad image(s) replaced by the next decodable record (records %s); "
                        "%d over the run, data.bad_image_budget=%d", self.dataset.rec_path, self.epoch,
                        len(self._bad_in_epoch), ", ".join(map(str, sorted(self._bad_in_epoch))),
                        len(self.bad_records), self.bad_image_budget)
        self._bad_in_epoch = set()
        self.epoch += 1
        self.batches_consumed = 0

    def _note_bad(self, bad: list[tuple[int, str]]) -> None:
        """Handle ``(key, reason)`` of records a batch could not use: stop (``error``), or
        count them and stop when more than ``bad_image_budget`` were met (``skip``)."""
        if not bad:
            return
        if self.on_bad_image == "error":
            raise RecordIOError(f"{bad[0][1]}; set data.on_bad_image=skip to replace bad images and go on")
        for key, reason in bad:
            self.bad_records.setdefault(key, reason)
            self._bad_in_epoch.add(key)
        self._check_budget()

    def _check_budget(self) -> None:
        if len(self.bad_records) > self.bad_image_budget:
            raise RecordIOError(f"{self.dataset.rec_path}: {len(self.bad_records)} bad images, more than "
                                f"data.bad_image_budget={self.bad_image_budget}: records "
                                f"{', '.join(map(str, sorted(self.bad_records)))}")

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches epoch after epoch, without end; the position advances as in ``__iter__``."""
        while True:
            yield from self

    def close(self) -> None:
        """Release worker processes, if the loader has any (the position is kept)."""

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "bad_records": sorted(self.bad_records)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position. Saved with another ``batch_size * world_size``, it becomes the
        batch after the same number of samples consumed in that epoch (rounded down, at most
        the end of the epoch)."""
        per_batch = int(state["batch_size"]) * int(state["world_size"])
        consumed = int(state["batches_consumed"]) * per_batch // (self.batch_size * self.world_size)
        self.epoch, self.batches_consumed = int(state["epoch"]), min(consumed, len(self))
        for key in state.get("bad_records", []):
            self.bad_records.setdefault(int(key), f"{self.dataset.rec_path}: record {key} (met before the resume)")
