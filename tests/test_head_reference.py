"""The sharded head against a plain single-process float64 full softmax.

Reference (``tests/reference.py``): the whole global batch and the whole class matrix in one
process, margin applied by hand, ``F.cross_entropy``-free log-sum-exp, autograd for the
gradients. The head runs on
1-4 real gloo processes with ``num_classes % world_size != 0`` and unequal local batches.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from partialfc import PartialFC
from partialfc.head.partial_fc import init_centres
from partialfc.losses import build_loss
from partialfc.testing import run_distributed
from tests.reference import SPECS, head_reference, make_problem

NUM_CLASSES, DIM, SCALE = 23, 8, 16.0
LOCAL_BATCHES = [5, 3, 6, 2]  # unequal on purpose
head_problem = partial(make_problem, local_batches=LOCAL_BATCHES, num_classes=NUM_CLASSES, dim=DIM, seed=1234)


def _rank_run(rank, world_size, loss_name, sample_rate, **head_options):
    batches, x, y, w = head_problem(world_size)
    lo = sum(batches[:rank])
    head = PartialFC(DIM, NUM_CLASSES, loss=SPECS[loss_name].with_scale(SCALE).build(build_loss), sample_rate=sample_rate,
                     dtype=torch.float64, seed=7, **head_options)
    with torch.no_grad():
        head.weight.copy_(w[head.class_start: head.class_start + head.num_local])
    x_local = x[lo: lo + batches[rank]].clone().requires_grad_(True)
    loss = head(x_local, y[lo: lo + batches[rank]])
    loss.backward()
    grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    sampled = None if head.last_sampled is None else (head.last_sampled + head.class_start)
    return dict(loss=loss.item(), grad_x=x_local.grad, grad_w=grad_w, start=head.class_start,
                num_local=head.num_local, sampled=sampled)


def check_against_reference(results, world_size, loss_name, sampled_classes=None):
    batches, x, y, w = head_problem(world_size)
    ref, grad_x, grad_w = head_reference(SPECS[loss_name].with_scale(SCALE).rows, x, y, w, sampled_classes)
    lo = 0
    for rank, res in enumerate(results):
        assert res["loss"] == pytest.approx(ref, rel=1e-6), f"rank {rank} loss"
        torch.testing.assert_close(res["grad_x"], grad_x[lo: lo + batches[rank]], rtol=1e-6, atol=1e-12)
        rows = slice(res["start"], res["start"] + res["num_local"])
        torch.testing.assert_close(res["grad_w"], grad_w[rows], rtol=1e-6, atol=1e-12)
        lo += batches[rank]


def test_shards_are_balanced_contiguous():
    from partialfc.head import shard_range

    for c, world in [(23, 4), (10, 3), (7, 7), (1_000_003, 8)]:
        ranges = [shard_range(c, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == c
        assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


@pytest.mark.parametrize("loss_name", ["normface", "cosface", "arcface"])
def test_single_process_matches_reference(loss_name):
    check_against_reference([_rank_run(0, 1, loss_name, 1.0)], 1, loss_name)


def _all_losses_run(rank, world_size):
    return {name: _rank_run(rank, world_size, name, 1.0) for name in ("normface", "cosface", "arcface")}


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gloo_rate1_matches_full_softmax(world_size):
    results = run_distributed(_all_losses_run, world_size)
    for name in ("normface", "cosface", "arcface"):
        check_against_reference([r[name] for r in results], world_size, name)


@pytest.mark.required
@pytest.mark.multiprocess
def test_gloo_sampled_matches_reference_on_sampled_set():
    world_size = 3
    results = run_distributed(_rank_run, world_size, "arcface", 0.5)
    classes = torch.cat([r["sampled"] for r in results])
    assert len(classes) < NUM_CLASSES
    _, _, y, _ = head_problem(world_size)
    assert set(y.tolist()) <= set(classes.tolist())
    check_against_reference(results, world_size, "arcface", classes)
    for r in results:  # the sparse gradient holds the sampled rows only
        touched = r["grad_w"].abs().sum(dim=1).nonzero().flatten() + r["start"]
        assert set(touched.tolist()) <= set(r["sampled"].tolist())


BOUNDED_CASES = [(name, rate, fused) for name in ("cosface", "arcface", "dsoftmax")
                 for rate, fused in ((1.0, "plain"), (0.5, "torch"))]


def _bounded_runs(rank, world_size):
    """The head with ``max_batch`` above every rank's batch (padding rows on every rank), its
    deferred check run after the backward."""
    out = {}
    for name, rate, fused in BOUNDED_CASES:
        out[name, rate, fused] = _rank_run(rank, world_size, name, rate, max_batch=max(LOCAL_BATCHES) + 2,
                                           fused=fused)
    return out


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 3])
def test_bounded_batches_match_reference(world_size):
    """Padded to ``max_batch`` and gathered with their labels in one collective, the unequal
    batches give the reference's loss and gradients: padding rows take no part."""
    results = run_distributed(_bounded_runs, world_size)
    for case in BOUNDED_CASES:
        per_rank = [r[case] for r in results]
        sampled = None if per_rank[0]["sampled"] is None else torch.cat([r["sampled"] for r in per_rank])
        check_against_reference(per_rank, world_size, case[0], sampled)


def test_init_is_independent_of_world_size():
    full = init_centres(0, 100_000, 4, 0.01, seed=3)
    part = init_centres(60_000, 10_000, 4, 0.01, seed=3)  # straddles an init block
    torch.testing.assert_close(part, full[60_000:70_000], rtol=0, atol=0)
