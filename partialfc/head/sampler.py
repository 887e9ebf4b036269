"""Per-rank sampling of class centres (Partial FC).

Each step keeps every positive class of the global batch that lives on this rank and fills
up to ``int(rate * num_local)`` centres with negatives drawn uniformly without replacement
from the rest of the shard. No importance correction is applied (as in the paper).
"""

from __future__ import annotations

import math

import torch

from partialfc.seeding import Stream, seeded_generator


class CentreSampler:
    """Draws the sampled centre indices of one rank's shard.

    Draws come from a private ``torch.Generator`` seeded with ``(seed, rank)``: ranks differ,
    runs are reproducible, and the state goes into a checkpoint. The generator lives on the
    device of the positives it is given. Generator states cannot move between device types
    (CPU Mersenne twister, CUDA Philox), so when the device changes (the head was moved, or a
    checkpoint written on another device type is loaded) the stream is re-seeded from
    ``(seed, rank, draws so far)``: still deterministic, though not the same stream.
    """

    def __init__(self, num_local: int, sample_rate: float, seed: int, rank: int,
                 device: torch.device | str = "cpu"):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in [0, 1], got {sample_rate}")
        self.num_local = num_local
        self.sample_rate = float(sample_rate)
        # int(rate * n), immune to binary rounding (0.29 * 100 is 28.999...): 29, not 28
        self.num_sample = math.floor(sample_rate * num_local + 1e-9)
        self.seed, self.rank = int(seed), int(rank)
        self.draws = 0
        self.generator = self._seeded(torch.device(device))

    def _seeded(self, device: torch.device) -> torch.Generator:
        return seeded_generator(self.seed, Stream.SAMPLER, self.rank, self.draws, device=device)

    def _moved(self, device: torch.device) -> torch.Generator:
        """The stream on ``device``: the same state on another GPU (``cuda:0`` -> ``cuda:1``),
        re-seeded at the draw count on another device type."""
        if device.type != self.generator.device.type:
            return self._seeded(device)
        moved = torch.Generator(device=device)
        moved.set_state(self.generator.get_state())
        return moved

    @property
    def samples_everything(self) -> bool:
        return self.num_sample >= self.num_local

    def sample(self, positives: torch.Tensor) -> torch.Tensor:
        """Return the sorted local indices to keep, shape ``(k,)`` int64, on ``positives``'s device.

        ``positives``: unique local indices (int64, sorted) of the classes of the global batch
        that live on this rank. ``k = max(len(positives), num_sample)``."""
        if self.samples_everything:
            return torch.arange(self.num_local, device=positives.device)
        if positives.numel() >= self.num_sample:
            return positives
        return self._draw(positives)

    def sample_batch(self, local: torch.Tensor) -> torch.Tensor:
        """:meth:`sample` for the local class indices ``local (B,)`` of a whole batch (entries
        outside ``[0, num_local)``: classes of other ranks; repeats allowed).

        When ``B < num_sample`` the positives cannot fill the sample, so the draw needs no
        count of them and runs without a host synchronisation."""
        if self.samples_everything or local.numel() >= self.num_sample:
            return self.sample(torch.unique(local[(local >= 0) & (local < self.num_local)]))
        return self.sample_bounded(local)[0]  # below the sample's size it is static and unpadded

    def sample_bounded(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`sample` with a size known before the labels are: for a head whose batch has a
        bound, ``local (B,)`` being its padded rows (as in :meth:`sample_batch`). Returns the
        sorted local indices ``index (S,)`` and ``live (S,)`` bool, the columns that take part
        (``None``: all), with ``S = min(num_local, max(num_sample, B))``, which ``B`` alone sets.

        The live columns are exactly :meth:`sample`'s, ``max(num_sample, positives)`` of them:
        every positive and uniform negatives. The others pad the sample up to the most
        positives ``B`` rows can hold (drawn, distinct, never a positive); the objectives leave
        them out and the row optimizers do not touch them. Below the sample's size (``B <
        num_sample``, every large run) nothing pads it. No host synchronisation either way."""
        positives = torch.where((local >= 0) & (local < self.num_local), local, self.num_local)
        size = min(self.num_local, max(self.num_sample, local.numel()))
        if size == self.num_sample:
            return self._draw(positives), None
        keys, flags = self._keys(positives)
        ranked = torch.topk(keys, size, sorted=True).indices  # the positives, then negatives at random
        live_count = flags.sum().clamp_min(self.num_sample)
        index, order = torch.sort(ranked)
        return index, (torch.arange(size, device=local.device) < live_count)[order]

    def _keys(self, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random keys ``(num_local,)`` with the ``positives`` (values equal to ``num_local``
        ignored) forced to the top, and the flags ``(num_local,)`` bool marking them: no
        data-dependent shape, no host synchronisation. One draw of the stream."""
        if self.generator.device != positives.device:
            self.generator = self._moved(positives.device)
        self.draws += 1
        keys = torch.rand(self.num_local, generator=self.generator, device=positives.device)
        flags = torch.zeros(self.num_local + 1, dtype=torch.bool, device=positives.device)
        flags[positives] = True
        return keys.masked_fill_(flags[: self.num_local], 2.0), flags[: self.num_local]

    def _draw(self, positives: torch.Tensor) -> torch.Tensor:
        """``num_sample`` sorted indices: every index of ``positives`` (values equal to
        ``num_local`` are ignored) plus uniform negatives without replacement."""
        index = torch.topk(self._keys(positives)[0], self.num_sample, sorted=False).indices
        return torch.sort(index).values

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "device_type": self.generator.device.type,
                "draws": self.draws, "seed": self.seed, "rank": self.rank,
                "sample_rate": self.sample_rate, "num_local": self.num_local}

    def reseed(self, draws: int) -> None:
        """Start the deterministic stream of ``(seed, rank, draws)``: used when a saved
        generator cannot be restored (another device type, another world size)."""
        self.draws = int(draws)
        self.generator = self._seeded(self.generator.device)

    def load_state_dict(self, state: dict) -> None:
        """Restore the stream; from another device type, re-seed at the saved draw count."""
        if state["device_type"] == self.generator.device.type:
            self.draws = int(state["draws"])
            self.generator.set_state(state["generator"])
        else:
            self.reseed(state["draws"])
