"""Per-rank sampling of class centres (Partial FC).

Each step keeps every positive class of the global batch that lives on this rank and fills
up to ``int(rate * num_local)`` centres with negatives drawn uniformly without replacement
from the rest of the shard. No importance correction is applied (as in the paper).
"""

from __future__ import annotations

import torch


class CentreSampler:
    """Draws the sampled centre indices of one rank's shard.

    Draws come from a private ``torch.Generator`` seeded with ``(seed, rank)`` so that
    ranks differ, runs are reproducible and the state goes into a checkpoint.
    """

    def __init__(self, num_local: int, sample_rate: float, seed: int, rank: int,
                 device: torch.device | str = "cpu"):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in [0, 1], got {sample_rate}")
        self.num_local = num_local
        self.sample_rate = float(sample_rate)
        self.num_sample = int(sample_rate * num_local)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        # Distinct, well-mixed stream per (seed, rank).
        self.generator.manual_seed((seed * 1_000_003 + rank * 7919 + 12345) % (2**63 - 1))

    @property
    def samples_everything(self) -> bool:
        return self.num_sample >= self.num_local

    def sample(self, positives: torch.Tensor) -> torch.Tensor:
        """Return the sorted local indices to keep, shape ``(k,)`` int64.

        ``positives``: unique local indices (int64, sorted) of the classes of the global batch
        that live on this rank. ``k = max(len(positives), num_sample)``."""
        if self.samples_everything:
            return torch.arange(self.num_local, device=self.device)
        if positives.numel() >= self.num_sample:
            return positives
        # Uniform draw without replacement from the non-positives: random keys, positives
        # forced to the top, take the k largest.
        keys = torch.rand(self.num_local, generator=self.generator, device=self.device)
        keys[positives] = 2.0
        index = torch.topk(keys, self.num_sample, sorted=False).indices
        return torch.sort(index).values

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "sample_rate": self.sample_rate,
                "num_local": self.num_local}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
