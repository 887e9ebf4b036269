"""Class centres and their optimizer state stored in bf16: unsampled rows and their state
stay bit-identical, stochastic rounding is unbiased (many updates far below bf16's
resolution move the rows as fp32 does, on average), and the head trains in bf16 storage."""

from __future__ import annotations

import pytest
import torch

from partialfc import PartialFC
from partialfc.head.optim import SparseRowAdamW, SparseRowSGD, stochastic_round_bf16
from partialfc.losses import CosFace

ROWS, DIM = 64, 32


def test_stochastic_rounding_is_unbiased():
    """The mean of 2e5 roundings of a value between two bf16 neighbours is the value
    (tolerance: 5 standard errors of the mean); bf16 values come back unchanged."""
    gen = torch.Generator().manual_seed(0)
    spacing = 2.0 ** -7  # bf16 spacing in [1, 2)
    for x in (1.0 + 0.3 * spacing, -(1.0 + 0.9 * spacing), 3e-3 * 1.37):
        values = torch.full((200_000,), x, dtype=torch.float32)
        rounded = stochastic_round_bf16(values, gen).float()
        lo, hi = rounded.min().item(), rounded.max().item()
        assert set(rounded.unique().tolist()) == {lo, hi} and lo < x < hi  # only the two neighbours
        frac = (x - lo) / (hi - lo)
        stderr = (hi - lo) * (frac * (1 - frac) / values.numel()) ** 0.5
        assert abs(rounded.mean().item() - x) < 5 * stderr
    exact = torch.tensor([1.0, -2.5, 0.0, 2.0 ** -20], dtype=torch.float32)
    assert torch.equal(stochastic_round_bf16(exact, gen).float(), exact)


def _sparse_grad(rows, values):
    return torch.sparse_coo_tensor(rows[None, :], values, (ROWS, DIM)).coalesce()


def _bits(t):
    return t.view(torch.int16).clone()


@pytest.mark.parametrize("make", [lambda p: SparseRowSGD([p], lr=0.05, momentum=0.9, weight_decay=1e-3, seed=1),
                                  lambda p: SparseRowAdamW([p], lr=1e-3, weight_decay=1e-2, seed=1)],
                         ids=["sgd", "adamw"])
def test_unsampled_rows_and_state_bit_identical(make):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(ROWS, DIM, generator=gen).to(torch.bfloat16))
    opt = make(p)
    sampled = torch.arange(0, ROWS, 2)
    p.grad = _sparse_grad(torch.arange(ROWS), torch.randn(ROWS, DIM, generator=gen).to(torch.bfloat16))
    opt.step()  # every row gets state
    before = _bits(p.detach())
    state_before = {k: _bits(v) for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dtype == torch.bfloat16}
    assert state_before and all(v.dtype == torch.bfloat16 for v in opt.state[p].values() if torch.is_tensor(v)
                                and v.shape == p.shape)
    p.grad = _sparse_grad(sampled, torch.randn(len(sampled), DIM, generator=gen).to(torch.bfloat16))
    opt.step()
    unsampled = torch.arange(1, ROWS, 2)
    after = _bits(p.detach())
    assert torch.equal(after[unsampled], before[unsampled])
    assert not torch.equal(after[sampled], before[sampled])
    for name, bits in state_before.items():
        assert torch.equal(_bits(opt.state[p][name])[unsampled], bits[unsampled]), name


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_many_small_updates_match_fp32_on_average(momentum):
    """2000 SGD steps whose update (1e-5 per step, ~1/800 of bf16's spacing at 1) round-to-
    nearest would drop entirely: the bf16 rows end where fp32 ends, on average over the
    256 x 128 entries (tolerance 1% of the drift, about 4 standard errors of that mean: the
    random walk's std per entry is ~8.8e-3, over 64 x 32 entries the bound was one standard
    error and failed for about 1 seed in 4), each entry within 6 standard deviations of the
    rounding's random walk."""
    steps, lr = 2000, 1e-5 * (1 - momentum)
    start = torch.ones(256, 128)
    grad = torch.ones(256, 128)
    p32 = torch.nn.Parameter(start.clone())
    p16 = torch.nn.Parameter(start.to(torch.bfloat16))
    opts = [SparseRowSGD([p32], lr=lr, momentum=momentum), SparseRowSGD([p16], lr=lr, momentum=momentum, seed=3)]
    for _ in range(steps):
        p32.grad, p16.grad = grad.clone(), grad.to(torch.bfloat16)
        for opt in opts:
            opt.step()
    drift = (start - p32.detach()).mean().item()
    assert drift == pytest.approx(steps * 1e-5, rel=0.05)  # fp32 moved (momentum warms up)
    assert ((start.to(torch.bfloat16) - 1e-5) == 1.0).all()  # round-to-nearest bf16 would never move
    assert p16.detach().float().mean().item() == pytest.approx(p32.detach().mean().item(), abs=0.01 * drift)
    walk = (steps * 2.0 ** -8 * 1e-5) ** 0.5  # std of the rounding's random walk per entry
    assert (p16.detach().float() - p32.detach()).abs().max().item() < 6 * walk


def test_rounding_is_reproducible_from_the_seed():
    def run(seed):
        p = torch.nn.Parameter(torch.ones(ROWS, DIM, dtype=torch.bfloat16))
        opt = SparseRowSGD([p], lr=1e-4, seed=seed)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_head_trains_with_bf16_storage():
    """A bf16-stored head (fused path, rate 0.5): fp32 loss close to the fp32-stored head on
    the same (rounded) centres, a sparse bf16 gradient, and SGD steps that lower the loss."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 16, generator=gen)
    y = torch.randint(0, 200, (32,), generator=gen)
    heads = {dtype: PartialFC(16, 200, loss=CosFace(s=16.0, m=0.2), sample_rate=0.5, dtype=dtype, seed=2)
             for dtype in (torch.float32, torch.bfloat16)}
    with torch.no_grad():
        heads[torch.float32].weight.copy_(heads[torch.bfloat16].weight.float())
    losses = {dtype: head(x, y) for dtype, head in heads.items()}
    assert losses[torch.bfloat16].dtype == torch.float32
    assert losses[torch.bfloat16].item() == pytest.approx(losses[torch.float32].item(), rel=2e-2)
    head = heads[torch.bfloat16]
    opt = SparseRowSGD(head.parameters(), lr=1.0, momentum=0.9)
    first = None
    for _ in range(10):
        loss = head(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert head.weight.grad.is_sparse and head.weight.grad.dtype == torch.bfloat16
        opt.step()
    assert head.weight.dtype == torch.bfloat16 and loss.item() < first
