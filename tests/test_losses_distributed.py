"""Every loss and both objectives across 1, 2 and 3 real gloo processes.

One spawn per world size runs all checks (results come back as numpy arrays) and the parent
compares them with (a) the single-process head and (b) the naive float64 formulas of
``tests/reference.py`` evaluated on the whole global batch and on the union of the sampled centres.
Classes split unevenly over the ranks, local batches differ, and in the objective check one
rank owns no column at all.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from partialfc import PartialFC
from partialfc.losses import build_loss
from partialfc.ops import Targets, dissected_softmax, softmax_cross_entropy
from partialfc.testing import run_distributed
from tests.reference import SPECS, dissected_rows, head_reference, make_problem, softmax_cross_entropy_rows

pytestmark = [pytest.mark.required, pytest.mark.multiprocess]

NUM_CLASSES, DIM = 61, 8
LOCAL_BATCHES = [5, 3, 6]
# Column splits of the objective check: rank 1 of 3 owns no column.
COLUMN_SPLITS = {1: [13], 2: [9, 4], 3: [6, 0, 7]}

RATE1_CASES = ["normface", "cosface", "arcface", "arcface_easy", "combined_2", "x2", "x2_exact", "search",
               "random", "arcface_filtered", "dsoftmax"]
# name -> requested sample rate (None: the rate the loss implies)
SAMPLED_CASES = {"cosface": 0.3, "combined_1": 0.3, "x2": 0.3, "dsoftmax_B": None, "dsoftmax_K": None,
                 "dsoftmax_K_rescaled": None}
# cases that are a spec of tests/reference.py with extra constructor parameters
VARIANTS = {"x2_exact": ("x2", dict(gradient="exact")), "arcface_filtered": ("arcface", dict(inter_threshold=0.1))}

# one target at cosine exactly 1 (through the head's clamp)
head_problem = partial(make_problem, local_batches=LOCAL_BATCHES, num_classes=NUM_CLASSES, dim=DIM, seed=2024,
                       target_at_one=True)


def make_loss(name):
    spec, extra = VARIANTS.get(name, (name, {}))
    return SPECS[spec].build(build_loss, **extra)


def reference_rows(name, cos, labels):
    """Naive float64 per-row losses of case ``name`` on cosines ``cos (B, n)``."""
    spec, extra = VARIANTS.get(name, (name, {}))
    loss = make_loss(name)
    return SPECS[spec].rows(cos, labels, threshold=extra.get("inter_threshold"),
                            straight_through=loss.gradient == "straight_through", a=getattr(loss, "a", None))


def objective_problem():
    """Logits ``(6, 13)``, their target columns ``(6,)`` and an upstream gradient ``(6,)``."""
    gen = torch.Generator().manual_seed(2024)
    logits = torch.randn(6, 13, generator=gen, dtype=torch.float64) * 4
    cols = torch.tensor([0, 5, 6, 12, 3, 9])
    upstream = torch.rand(6, generator=gen, dtype=torch.float64)
    return logits, cols, upstream


def _objectives_on_rank(rank, world_size):
    logits, cols, upstream = objective_problem()
    sizes = COLUMN_SPLITS[world_size]
    lo = sum(sizes[:rank])
    local = logits[:, lo: lo + sizes[rank]].clone().requires_grad_(True)
    targets = Targets.from_columns(torch.where((cols >= lo) & (cols < lo + sizes[rank]), cols - lo, -1), sizes[rank])
    out = {}
    for key, fn in [("softmax", lambda z: softmax_cross_entropy(z, targets)),
                    ("dissected", lambda z: dissected_softmax(z, targets, intra_logit=2.0)),
                    ("dissected_scaled", lambda z: dissected_softmax(z, targets, intra_logit=-1.0,
                                                                     inter_scale=3.0))]:
        loss = fn(local)
        grad, = torch.autograd.grad((loss * upstream).sum(), local)
        out[key] = (loss.detach().numpy(), grad.numpy())
    return out


def _head_run(rank, name, sample_rate, problem):
    """One step of a float64 head holding this rank's shard of ``w``; numpy results."""
    batches, x, y, w = problem
    rows = slice(sum(batches[:rank]), sum(batches[:rank + 1]))
    head = PartialFC(DIM, NUM_CLASSES, loss=make_loss(name), sample_rate=sample_rate, dtype=torch.float64, seed=5)
    head.weight.data = w[head.class_start: head.class_start + head.num_local].clone()
    x_local = x[rows].clone().requires_grad_(True)
    loss = head(x_local, y[rows])
    loss.backward()
    sampled = torch.arange(head.num_local) if head.last_sampled is None else head.last_sampled
    return dict(loss=loss.item(), grad_x=x_local.grad.numpy(), grad_w=head.weight.grad.to_dense().numpy(),
                sampled=(sampled + head.class_start).numpy(), rate=head.sample_rate)


def _rank_run(rank, world_size):
    problem = head_problem(world_size)
    return dict(objectives=_objectives_on_rank(rank, world_size),
                rate1={n: _head_run(rank, n, None, problem) for n in RATE1_CASES},
                sampled={n: _head_run(rank, n, r, problem) for n, r in SAMPLED_CASES.items()})


@pytest.fixture(scope="module", params=[1, 2, 3])
def world(request):
    world_size = request.param
    return world_size, run_distributed(_rank_run, world_size)


def test_sharded_objectives_match_single_process(world):
    world_size, results = world
    logits, cols, upstream = objective_problem()
    z = logits.clone().requires_grad_(True)
    references = {
        "softmax": softmax_cross_entropy_rows(z, cols),
        "dissected": dissected_rows(z, cols, intra_logit=2.0),
        "dissected_scaled": dissected_rows(z, cols, intra_logit=-1.0, inter_scale=3.0),
    }
    for key, ref in references.items():
        ref_grad, = torch.autograd.grad((ref * upstream).sum(), z, retain_graph=True)
        grads = []
        for rank in range(world_size):
            loss, grad = results[rank]["objectives"][key]
            np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=key)
            grads.append(grad)
        # each rank's logits gradient is local: the pieces concatenate to the full gradient
        np.testing.assert_allclose(np.concatenate(grads, axis=1), ref_grad.numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=key)


def check_head(results, name, kind, world_size, classes):
    batches, x, y, w = head_problem(world_size)
    ref_loss, ref_gx, ref_gw = head_reference(partial(reference_rows, name), x, y, w, classes)
    grad_x = np.concatenate([r[kind][name]["grad_x"] for r in results])
    grad_w = np.concatenate([r[kind][name]["grad_w"] for r in results])
    for r in results:
        assert r[kind][name]["loss"] == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), name
    np.testing.assert_allclose(grad_x, ref_gx.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(grad_w, ref_gw.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", RATE1_CASES)
def test_head_rate1_matches_single_process(world, name):
    world_size, results = world
    batches, x, y, w = head_problem(world_size)
    single = PartialFC(DIM, NUM_CLASSES, loss=make_loss(name), dtype=torch.float64)
    with torch.no_grad():
        single.weight.copy_(w)
    assert all(r["rate1"][name]["rate"] == 1.0 for r in results)
    expected = single(x, y).item()
    for r in results:
        assert r["rate1"][name]["loss"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    check_head(results, name, "rate1", world_size, torch.arange(NUM_CLASSES))


@pytest.mark.parametrize("name", list(SAMPLED_CASES))
def test_head_sampled_matches_reference_on_same_set(world, name):
    world_size, results = world
    batches, x, y, w = head_problem(world_size)
    rates = {r["sampled"][name]["rate"] for r in results}
    assert rates == {SAMPLED_CASES[name] if SAMPLED_CASES[name] is not None else make_loss(name).sample_rate}
    classes = np.concatenate([r["sampled"][name]["sampled"] for r in results])
    assert set(y.tolist()) <= set(classes.tolist()) and len(classes) < NUM_CLASSES
    if name == "dsoftmax_B":  # rate 0: exactly the classes of the global batch
        assert sorted(classes.tolist()) == sorted(set(y.tolist()))
    check_head(results, name, "sampled", world_size, classes)
    unsampled = np.setdiff1d(np.arange(NUM_CLASSES), classes)
    grad_w = np.concatenate([r["sampled"][name]["grad_w"] for r in results])
    assert not grad_w[unsampled].any()
