"""Sparse-row optimizers: equal to torch's at rate 1; unsampled rows untouched at rate < 1."""

from __future__ import annotations

import copy

import pytest
import torch

from partialfc import PartialFC, SparseRowAdamW, SparseRowSGD
from partialfc.head.optim import combine_rows, mark_head_gradient, sparse_rows

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


def _train(block_rows, dtype, rate, make):
    """Weight and optimizer state after 3 steps of a head; the second step accumulates two
    backwards (a sparse gradient with repeated rows, which must be coalesced)."""
    head = PartialFC(16, 400, sample_rate=rate, dtype=dtype)
    opt = make(head.parameters(), block_rows)
    data = batches(4, 400)
    for step, (x, y) in enumerate(data[:3]):
        opt.zero_grad()
        head(x, y).backward()
        if step == 1:
            head(*data[3]).backward()
        opt.step()
    state = {k: v.clone() for k, v in opt.state[head.weight].items() if torch.is_tensor(v)}
    return head.weight.detach().clone(), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rate", [1.0, 0.25])
@pytest.mark.parametrize("make", [
    lambda params, block: SparseRowSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True,
                                       seed=2, block_rows=block),
    lambda params, block: SparseRowAdamW(params, lr=1e-2, weight_decay=0.05, seed=2, block_rows=block)],
    ids=["sgd", "adamw"])
def test_blocks_smaller_than_the_sample_give_the_one_block_result(make, rate, dtype):
    """Stepping the rows 7 at a time (about 100 sampled rows, 400 at rate 1) is bit-identical
    to one block, bf16 storage and its stochastic rounding included (CPU generator)."""
    weight, state = _train(7, dtype, rate, make)
    weight_one, state_one = _train(10**6, dtype, rate, make)
    assert torch.equal(weight.view(torch.uint8), weight_one.view(torch.uint8))
    assert state.keys() == state_one.keys() and len(state) >= 1
    for key in state:
        assert torch.equal(state[key].view(torch.uint8), state_one[key].view(torch.uint8)), key


def test_sparse_rows_takes_the_heads_gradient_without_a_copy():
    """The head's gradient (unique sorted rows) is used as it stands; one with repeated rows
    comes back coalesced (each row once, its values summed)."""
    head = PartialFC(16, 400, sample_rate=0.1, dtype=torch.float64)
    (x, y), (x2, y2) = batches(2, 400)
    head(x, y).backward()
    grad = head.weight.grad
    rows, values = sparse_rows(grad)
    assert torch.equal(rows, head.last_sampled)
    assert values.data_ptr() == grad._values().data_ptr()
    first = head.last_sampled
    head(x2, y2).backward()
    rows, values = sparse_rows(head.weight.grad)
    dense = head.weight.grad.to_dense()
    assert torch.equal(rows, torch.cat([first, head.last_sampled]).unique())
    assert torch.equal(values, dense[rows])
    with pytest.raises(ValueError, match="block_rows"):
        SparseRowSGD(head.parameters(), lr=0.1, block_rows=0)


def _live_only(grad: torch.Tensor, live_rows: torch.Tensor) -> torch.Tensor:
    """The sparse gradient of the rows ``live_rows`` marks, built by hand from the dense one."""
    rows = live_rows.nonzero().flatten()
    return torch.sparse_coo_tensor(rows[None], grad.to_dense()[rows], grad.shape, check_invariants=True).coalesce()


@pytest.mark.parametrize("name", ["sgd", "sgd_nesterov", "adamw"])
def test_a_padded_sample_steps_the_rows_that_took_part_only(name):
    """A bounded head whose padded rows can hold more positives than its sample (12 rows, 8
    centres) pads the sample with rows that take no part: their gradient is 0, and with
    ``live_rows`` the step equals a step on a gradient of the live rows alone (bit for bit,
    state included, over steps with one and two backwards); without it they decay."""
    ours_cls, _, kw = OPTIMIZERS[name]
    head = PartialFC(16, 400, sample_rate=0.02, max_batch=12, dtype=torch.float64)
    twin, careless = torch.nn.Parameter(head.weight.detach().clone()), copy.deepcopy(head)
    opt, twin_opt, careless_opt = (ours_cls([p], **kw) for p in (head.weight, twin, careless.weight))
    data = batches(6, 400)
    for step in range(4):
        micro = [data[step]] + ([data[5]] if step == 2 else [])
        for x, y in micro:
            y = y % 5 if step == 1 else y  # few positives: the sample is mostly negatives
            for h in (head, careless):
                h(x, y).backward()
        live_rows = head.take_live_rows()
        careless.take_live_rows()
        if step == 1:  # 5 positives: 8 live rows, 4 padding rows
            assert int(live_rows.sum()) == 8 and head.weight.grad._nnz() == 12
        twin.grad = _live_only(head.weight.grad, live_rows)
        opt.step(live_rows=live_rows)
        twin_opt.step()
        careless_opt.step()
        for o in (opt, twin_opt, careless_opt):
            o.zero_grad()
        assert torch.equal(head.weight, twin)
        for key, value in twin_opt.state[twin].items():
            assert torch.equal(opt.state[head.weight][key], value), key
    assert not torch.equal(careless.weight, twin)  # the padding rows moved as if they had been sampled


def test_rows_are_marked_live_by_a_backward_only():
    """A forward without gradients, or whose loss is dropped, marks no row live (its padding
    rows would otherwise be decayed by the next step); a backward marks the live ones."""
    head = PartialFC(16, 400, sample_rate=0.02, max_batch=12, dtype=torch.float64)
    (x, y), = batches(1, 400)
    with torch.no_grad():
        head(x, y % 5)
    head(x, y % 5)  # dropped
    assert head.take_live_rows() is None
    head(x, y % 5).backward()
    marked = head.take_live_rows()
    assert marked.nonzero().flatten().tolist() == head.last_sampled.tolist() and int(marked.sum()) == 8
    assert head.take_live_rows() is None


def _summed_micro_steps(num_rows: int, samples: list[int], dtype, seed: int) -> torch.Tensor:
    """A sparse gradient as autograd sums it over micro-steps: each step's rows sorted and
    distinct, the steps concatenated (rows repeat across steps); integer values, so that
    every sum is exact in any order."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randperm(num_rows, generator=gen)[:k].sort().values for k in samples])
    values = torch.randint(-64, 64, (len(rows), 3), generator=gen).to(dtype)
    return torch.sparse_coo_tensor(rows[None], values, (num_rows, 3), check_invariants=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_rows, samples", [(50, [8, 8]), (50, [20, 20, 20]), (12, [9, 9, 9]), (30, [0, 5])])
def test_combined_rows_equal_coalesce_at_a_static_size(num_rows, samples, dtype):
    """combine_rows (the summed gradient of several micro-steps): the same dense gradient as
    ``coalesce()``, ``min(nnz, num_rows)`` sorted distinct rows, the absent ones zero and
    outside ``present``, and no host synchronisation."""
    from partialfc.testing.host_syncs import HostSyncCounter

    grad = _summed_micro_steps(num_rows, samples, dtype, seed=num_rows + len(samples))
    with HostSyncCounter() as counted:
        combined, present = combine_rows(grad)
    assert counted.syncs == 0
    reference = grad.coalesce()
    rows = combined._indices()[0]
    assert combined.is_coalesced() and len(rows) == min(sum(samples), num_rows)
    assert rows.tolist() == sorted(set(rows.tolist()))
    assert torch.equal(combined.to_dense(), reference.to_dense())
    assert present.nonzero().flatten().tolist() == reference._indices()[0].tolist()
    assert not combined.to_dense()[~present].any()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_step_on_combined_rows_equals_a_step_on_the_coalesced_gradient(name):
    """Two micro-steps summed: the step on the combined gradient, told its present rows, is
    bit for bit the step on ``coalesce()``'s; filler rows keep their values and state."""
    ours_cls, _, kw = OPTIMIZERS[name]
    weights = [torch.nn.Parameter(torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
               for _ in range(2)]
    optimizers = [ours_cls([w], **kw) for w in weights]
    for step in range(3):
        grad = _summed_micro_steps(40, [9, 9], torch.float64, seed=step)
        weights[0].grad = grad.clone()
        present = mark_head_gradient(weights[0], backwards=2)
        weights[1].grad = grad.coalesce()
        optimizers[0].step(live_rows=present)
        optimizers[1].step()
        assert torch.equal(weights[0], weights[1]), step
        state = [o.state[w] for o, w in zip(optimizers, weights)]
        assert all(torch.equal(state[0][k], state[1][k]) for k in state[1]), step
