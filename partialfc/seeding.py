"""Every random stream of a run, derived from the run's one ``seed``.

``derive_seed(seed, stream, *keys)`` mixes the seed, a named :class:`Stream` and that
stream's integer keys with :class:`numpy.random.SeedSequence` into a 63-bit seed (valid for
torch's CPU and CUDA generators and for DALI). Each stream has one formula; the name is
hashed into the entropy right after the seed, and every value takes a fixed 64-bit width, so
two streams, or two key tuples of one stream, never share a seed sequence.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


class Stream(str, enum.Enum):
    """The named streams and the keys each one takes after the seed."""

    HEAD_INIT = "head.init"  # init block index
    SAMPLER = "head.sampler"  # rank, draws so far
    RANDOM_SOFTMAX = "loss.random_softmax"  # epoch
    SEARCH = "train.search"  # epoch, candidate (Search-Softmax's draw of x ~ N(mu, sigma))
    RANK = "train.rank"  # rank, step (torch's global generators: dropout, ...)
    DALI = "data.dali"  # epoch the pipeline was built at
    DATA_WORKERS = "data.workers"  # rank (the DataLoader's worker seeds, off torch's global generator)
    ROUNDING = "head.rounding"  # parameter index, optimizer step (stochastic rounding of bf16 centres)


def _words(value: int) -> list[int]:
    """An int of at most 64 bits (two's complement if negative) as two uint32 words."""
    value = int(value)
    if not -(1 << 63) <= value <= _MASK64:
        raise ValueError(f"seed key {value} does not fit in 64 bits")
    value &= _MASK64
    return [value & 0xFFFFFFFF, value >> 32]


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """The seed in ``[0, 2**63)`` of ``stream`` at ``keys`` for the run seeded with ``seed``."""
    name = int.from_bytes(hashlib.sha256(Stream(stream).value.encode()).digest()[:8], "little")
    entropy = [*_words(seed), *_words(name), *(word for key in keys for word in _words(key))]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, stream: Stream, *keys: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *keys))
