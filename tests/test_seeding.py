"""The one seed derivation: deterministic, 63-bit, no collisions between streams or keys."""

import itertools

import pytest
import torch

from partialfc.seeding import Stream, derive_seed, seeded_generator


def test_stream_names_are_distinct():
    names = [member.value for member in Stream.__members__.values()]  # aliases included
    assert len(set(names)) == len(names)


def test_seeds_are_deterministic_63_bit_and_distinct():
    cases = [(seed, stream, *keys) for seed in (0, 1, -1, 2**40)
             for stream in Stream for keys in itertools.product((0, 1, 7919, 2**32), repeat=2)]
    seeds = [derive_seed(*case) for case in cases]
    assert seeds == [derive_seed(*case) for case in cases]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(cases)


def test_keys_that_a_linear_formula_or_a_word_concatenation_would_merge():
    # seed * 1_000_003 + block, and [1] vs [1, 0] / [2**32] vs [0, 1] as SeedSequence entropy
    assert derive_seed(1, Stream.HEAD_INIT, 0) != derive_seed(0, Stream.HEAD_INIT, 1_000_003)
    assert derive_seed(0, Stream.SAMPLER, 1, 0) != derive_seed(0, Stream.SAMPLER, 0, 2**32)
    assert derive_seed(0, Stream.RANK, 0, 0) != derive_seed(0, Stream.RANDOM_SOFTMAX, 0)
    with pytest.raises(ValueError, match="64 bits"):
        derive_seed(0, Stream.RANK, 2**64, 0)


def test_generator_is_seeded_with_the_derived_seed():
    reference = torch.Generator().manual_seed(derive_seed(5, Stream.SAMPLER, 2, 3))
    assert torch.equal(torch.rand(8, generator=seeded_generator(5, Stream.SAMPLER, 2, 3)),
                       torch.rand(8, generator=reference))
