"""Sparse-row optimizers: equal to torch's at rate 1; unsampled rows untouched at rate < 1."""

from __future__ import annotations

import copy

import pytest
import torch

from partialfc import PartialFC, SparseRowAdamW, SparseRowSGD

OPTIMIZERS = {
    "sgd": (SparseRowSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (SparseRowSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "sgd_plain": (SparseRowSGD, torch.optim.SGD, dict(lr=0.3)),
    "adamw": (SparseRowAdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)),
}


def batches(steps, classes, dim=16, batch=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=gen, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=gen)) for _ in range(steps)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_rate_one_matches_torch_optimizer(name):
    ours_cls, torch_cls, kw = OPTIMIZERS[name]
    head = PartialFC(16, 40, sample_rate=1.0, dtype=torch.float64)
    twin = copy.deepcopy(head)
    ours, theirs = ours_cls(head.parameters(), **kw), torch_cls(twin.parameters(), **kw)
    for x, y in batches(6, 40):
        for h, opt in ((head, ours), (twin, theirs)):
            opt.zero_grad()
            h(x, y).backward()
            opt.step()
        torch.testing.assert_close(head.weight, twin.weight, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unsampled_rows_and_state_are_untouched(name):
    ours_cls, _, kw = OPTIMIZERS[name]
    head = PartialFC(16, 400, sample_rate=0.1, dtype=torch.float64)
    opt = ours_cls(head.parameters(), **kw)
    data = batches(5, 400)
    for x, y in data[:-1]:  # give many rows some optimizer state first
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    weight_before = head.weight.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[head.weight].items()}
    opt.zero_grad()
    head(*data[-1]).backward()
    grad = head.weight.grad
    assert grad.is_sparse, "rate < 1 must not materialise a dense gradient of the shard"
    sampled = head.last_sampled
    assert torch.equal(grad.coalesce().indices()[0].unique(), sampled)
    opt.step()
    untouched = torch.ones(400, dtype=torch.bool)
    untouched[sampled] = False
    assert torch.equal(head.weight.detach()[untouched], weight_before[untouched])
    assert not torch.equal(head.weight.detach()[sampled], weight_before[sampled])
    for key, before in state_before.items():
        after = opt.state[head.weight][key]
        assert torch.equal(after[untouched], before[untouched]), key


def test_sparse_step_equals_dense_step_on_the_same_rows():
    """A sparse-row SGD step equals torch's SGD on the sampled rows (first step, no state)."""
    head = PartialFC(16, 400, sample_rate=0.1, dtype=torch.float64)
    twin = copy.deepcopy(head)
    x, y = batches(1, 400)[0]
    head(x, y).backward()
    rows = head.last_sampled
    SparseRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4).step()
    dense = twin.weight.detach()[rows].clone().requires_grad_(True)
    dense.grad = torch.zeros_like(dense)
    twin(x, y).backward()
    dense.grad.copy_(twin.weight.grad.to_dense()[rows])
    torch.optim.SGD([dense], lr=0.1, momentum=0.9, weight_decay=5e-4).step()
    torch.testing.assert_close(head.weight.detach()[rows], dense.detach(), rtol=1e-13, atol=1e-15)
