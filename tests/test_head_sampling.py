"""Centre sampling: positives kept, exact counts, uniform negatives, seeded streams."""

from __future__ import annotations

import pytest
import torch

from partialfc import PartialFC
from partialfc.head import CentreSampler


def test_positives_kept_and_exact_count():
    sampler = CentreSampler(num_local=1000, sample_rate=0.1, seed=0, rank=0)
    for n_pos in (0, 1, 37, 100, 250):
        positives = torch.randperm(1000)[:n_pos].sort().values
        index = sampler.sample(positives)
        assert len(index) == max(n_pos, 100)
        assert len(torch.unique(index)) == len(index)
        assert set(positives.tolist()) <= set(index.tolist())
        assert bool((index[1:] > index[:-1]).all())  # sorted


def test_rate_one_and_zero():
    assert CentreSampler(50, 1.0, 0, 0).sample(torch.tensor([3])).tolist() == list(range(50))
    pos = torch.tensor([2, 9, 40])
    assert CentreSampler(50, 0.0, 0, 0).sample(pos).tolist() == [2, 9, 40]
    with pytest.raises(ValueError, match="sample_rate"):
        CentreSampler(50, 1.5, 0, 0)


def test_negatives_are_uniform():
    """Chi-square over 4000 draws: every non-positive centre equally likely."""
    n, k, steps = 200, 50, 4000
    positives = torch.tensor([0, 5, 17, 100, 199])
    sampler = CentreSampler(n, k / n, seed=11, rank=0)
    counts = torch.zeros(n)
    for _ in range(steps):
        counts[sampler.sample(positives)] += 1
    assert bool((counts[positives] == steps).all())
    negatives = torch.ones(n, dtype=torch.bool)
    negatives[positives] = False
    observed = counts[negatives]
    p = (k - len(positives)) / negatives.sum().item()
    expected = steps * p
    chi2 = (((observed - expected) ** 2) / (expected * (1 - p))).sum().item()
    df = negatives.sum().item() - 1
    assert abs(chi2 - df) < 5 * (2 * df) ** 0.5, f"chi2={chi2:.1f} for df={df}"
    # the test has power: a sampler biased towards low indices is rejected
    biased = torch.zeros(n)
    biased[negatives.nonzero().flatten()[: k - 5]] = steps
    chi2_biased = (((biased[negatives] - expected) ** 2) / (expected * (1 - p))).sum().item()
    assert abs(chi2_biased - df) > 5 * (2 * df) ** 0.5


def test_draws_differ_across_steps_and_ranks_and_repeat_for_seed():
    pos = torch.tensor([1, 2, 3])
    a0, a1 = CentreSampler(500, 0.1, seed=5, rank=0), CentreSampler(500, 0.1, seed=5, rank=1)
    first, second = a0.sample(pos), a0.sample(pos)
    assert not torch.equal(first, second)
    assert not torch.equal(first, a1.sample(pos))
    again = CentreSampler(500, 0.1, seed=5, rank=0)
    assert torch.equal(again.sample(pos), first) and torch.equal(again.sample(pos), second)
    assert not torch.equal(CentreSampler(500, 0.1, seed=6, rank=0).sample(pos), first)


def test_sampler_state_round_trips_through_head_state_dict():
    head = PartialFC(8, 300, sample_rate=0.1, seed=3)
    x, y = torch.randn(6, 8), torch.randint(0, 300, (6,))
    head(x, y)
    state = head.state_dict()
    head(x, y)
    expected = head.last_sampled.clone()
    other = PartialFC(8, 300, sample_rate=0.1, seed=99)
    other.load_state_dict(state)
    other(x, y)
    assert torch.equal(other.last_sampled, expected)
    assert torch.equal(other.weight, head.weight)


def test_head_keeps_batch_positives_and_count():
    head = PartialFC(8, 1000, sample_rate=0.05)
    y = torch.randint(0, 1000, (64,))
    head(torch.randn(64, 8), y)
    assert set(y.tolist()) <= set(head.last_sampled.tolist())
    assert len(head.last_sampled) == max(len(torch.unique(y)), 50)


def test_sampler_state_from_another_device_type_reseeds_deterministically():
    pos = torch.tensor([4, 8])
    sampler = CentreSampler(300, 0.1, seed=1, rank=0)
    sampler.sample(pos)
    saved = sampler.state_dict()
    assert saved["draws"] == 1 and saved["device_type"] == "cpu"
    from_gpu = dict(saved, device_type="cuda", generator=torch.zeros(16, dtype=torch.uint8))
    a, b = CentreSampler(300, 0.1, seed=1, rank=0), CentreSampler(300, 0.1, seed=1, rank=0)
    a.load_state_dict(from_gpu)
    b.load_state_dict(from_gpu)
    first = a.sample(pos)
    assert a.draws == 2 and torch.equal(first, b.sample(pos))
    assert set(pos.tolist()) <= set(first.tolist()) and len(first) == 30


def test_sample_count_is_not_lost_to_binary_rounding():
    assert 0.29 * 100 < 29  # the float product falls just short
    assert CentreSampler(100, 0.29, seed=0, rank=0).num_sample == 29


@pytest.mark.parametrize("rate, batch", [(0.1, 40), (0.1, 300), (0.0, 40), (1.0, 40)])
def test_batch_draw_equals_draw_from_unique_positives(rate, batch):
    """sample_batch (raw local labels, other ranks' classes and repeats included; no count of
    the positives while the batch is smaller than the sample) draws what sample() draws from
    the unique in-shard positives, from the same stream."""
    local = torch.randint(-200, 700, (batch,), generator=torch.Generator().manual_seed(batch))
    by_batch, by_positives = CentreSampler(500, rate, seed=2, rank=1), CentreSampler(500, rate, seed=2, rank=1)
    for _ in range(3):
        positives = torch.unique(local[(local >= 0) & (local < 500)])
        got, expected = by_batch.sample_batch(local), by_positives.sample(positives)
        assert torch.equal(got, expected)
        assert set(positives.tolist()) <= set(got.tolist())
    assert by_batch.draws == by_positives.draws


@pytest.mark.parametrize("num_local, rate, batch", [(60, 0.1, 40), (60, 0.1, 100), (60, 0.0, 40), (500, 0.1, 40),
                                                    (30, 0.5, 12)])
def test_a_bounded_draw_pads_the_sample_to_a_size_set_by_the_batch_alone(num_local, rate, batch):
    """sample_bounded: ``S = min(num_local, max(num_sample, B))`` sorted distinct columns,
    whatever the labels; the live ones are every positive plus negatives up to
    ``max(num_sample, positives)``, as sample() keeps; below the sample's size nothing pads
    it and the draw is sample_batch's, from the same stream. No host synchronisation."""
    from partialfc.testing.host_syncs import HostSyncCounter

    gen = torch.Generator().manual_seed(batch)
    bounded, eager = CentreSampler(num_local, rate, seed=4, rank=0), CentreSampler(num_local, rate, seed=4, rank=0)
    size = min(num_local, max(bounded.num_sample, batch))
    for spread in (3, num_local, 2 * num_local):  # few positives, many, many and other ranks' classes
        local = torch.randint(-spread // 2, spread, (batch,), generator=gen)
        with HostSyncCounter() as counted:
            index, live = bounded.sample_bounded(local)
        assert sum(counted.sync_sites.values()) == 0
        positives = set(local[(local >= 0) & (local < num_local)].tolist())
        assert len(index) == size and index.tolist() == sorted(set(index.tolist()))
        if size == bounded.num_sample:
            assert live is None and torch.equal(index, eager.sample_batch(local))
            continue
        eager.sample_batch(local)  # keep the streams together
        kept = index[live].tolist()
        assert positives <= set(kept) and len(kept) == max(bounded.num_sample, len(positives))


def test_a_bounded_draws_live_negatives_are_uniform():
    """The live negatives of a padded sample (B = 60 rows over 200 centres at rate 0.1:
    20 live among 60 columns) are uniform over the non-positives (chi-square, 4000 draws)."""
    n, steps = 200, 4000
    local = torch.tensor([0, 5, 17, 100, 199] * 12)
    sampler = CentreSampler(n, 0.1, seed=12, rank=0)
    counts = torch.zeros(n)
    for _ in range(steps):
        index, live = sampler.sample_bounded(local)
        counts[index[live]] += 1
    positives = local.unique()
    assert bool((counts[positives] == steps).all())
    negatives = torch.ones(n, dtype=torch.bool)
    negatives[positives] = False
    p = (sampler.num_sample - len(positives)) / negatives.sum().item()
    expected = steps * p
    chi2 = (((counts[negatives] - expected) ** 2) / (expected * (1 - p))).sum().item()
    df = negatives.sum().item() - 1
    assert abs(chi2 - df) < 5 * (2 * df) ** 0.5, f"chi2={chi2:.1f} for df={df}"


def test_a_loss_module_of_its_own_gets_an_unpadded_sample():
    """A loss that is not a MarginLoss may reduce over every column it is given: a bounded head
    hands it the unpadded sample (max(num_sample, positives) columns), not a padded one."""
    widths = []

    class Mean(torch.nn.Module):
        def forward(self, cos, targets, group=None):
            widths.append((cos.shape[1], targets.columns))
            return cos.mean(dim=1)

    head = PartialFC(8, 400, loss=Mean(), sample_rate=0.02, max_batch=12)  # 8 centres, 12 rows
    y = torch.tensor([1, 2, 3] * 4)
    head(torch.randn(12, 8), y)
    head.check_inputs()
    assert widths == [(8, None)] and set(y.tolist()) <= set(head.last_sampled.tolist())
