"""Every loss and both objectives across 1, 2 and 3 real gloo processes.

One spawn per world size runs all checks (results come back as numpy arrays) and the parent
compares them with (a) the single-process head and (b) the naive float64 formulas of
``test_losses`` evaluated on the whole global batch and on the union of the sampled centres.
Classes split unevenly over the ranks, local batches differ, and in the objective check one
rank owns no column at all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_losses import SPECS, ref_dsoftmax_loss, ref_softmax_loss

from partialfc import PartialFC
from partialfc.ops import Targets, dissected_softmax, softmax_cross_entropy
from partialfc.losses import ArcFace, DSoftmax, RandomSoftmax
from partialfc.testing import run_distributed

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
DSOFTMAX = {"dsoftmax": dict(s=16.0, d=0.6), "dsoftmax_B": dict(s=16.0, d=0.6, variant="B"),
            "dsoftmax_K": dict(s=16.0, d=0.6, variant="K", K=4),
            "dsoftmax_K_rescaled": dict(s=16.0, d=0.6, variant="K", K=4, rescale_inter=True)}


def make_loss(name):
    if name in DSOFTMAX:
        return DSoftmax(**DSOFTMAX[name])
    if name == "x2_exact":
        return SPECS["x2"][0](gradient="exact")
    if name == "arcface_filtered":
        return ArcFace(s=64.0, m=0.5, inter_threshold=0.1)
    if name == "random":
        loss = RandomSoftmax(s=32.0, seed=1)
        loss.set_epoch(3)
        return loss
    return SPECS[name][0]()


def reference_rows(name, cos, labels):
    """Naive float64 per-row losses of case ``name`` on cosines ``cos (B, n)``."""
    if name in DSOFTMAX:
        p = DSOFTMAX[name]
        return ref_dsoftmax_loss(cos, labels, p["s"], p["d"], scale=p["K"] if p.get("rescale_inter") else 1.0)
    loss = make_loss(name)
    if name == "random":  # CosFace with m = ln(1 - a)/s for the drawn a
        psi = lambda c: c - math.log(1.0 - loss.a) / loss.s  # noqa: E731
    else:
        psi = SPECS[{"x2_exact": "x2", "arcface_filtered": "arcface"}.get(name, name)][1]
    threshold = 0.1 if name == "arcface_filtered" else None
    return ref_softmax_loss(cos, labels, loss.s, psi, threshold=threshold,
                            straight_through=loss.gradient == "straight_through")


def make_problem(world_size):
    gen = torch.Generator().manual_seed(2024)
    batches = LOCAL_BATCHES[:world_size]
    x = torch.randn(sum(batches), DIM, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (sum(batches),), generator=gen)
    y[0] = NUM_CLASSES - 1
    w = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    w[y[1]] = x[1] * 3.0  # one target at cosine exactly 1 (through the head's clamp)
    logits = torch.randn(6, 13, generator=gen, dtype=torch.float64) * 4
    cols = torch.tensor([0, 5, 6, 12, 3, 9])
    upstream = torch.rand(6, generator=gen, dtype=torch.float64)
    return batches, x, y, w, logits, cols, upstream


def _objectives_on_rank(rank, world_size):
    *_, logits, cols, upstream = make_problem(world_size)
    sizes = COLUMN_SPLITS[world_size]
    lo = sum(sizes[:rank])
    local = logits[:, lo: lo + sizes[rank]].clone().requires_grad_(True)
    targets = Targets.from_columns(torch.where((cols >= lo) & (cols < lo + sizes[rank]), cols - lo, -1))
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
    batches, x, y, w = problem[:4]
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
    problem = make_problem(world_size)
    return dict(objectives=_objectives_on_rank(rank, world_size),
                rate1={n: _head_run(rank, n, None, problem) for n in RATE1_CASES},
                sampled={n: _head_run(rank, n, r, problem) for n, r in SAMPLED_CASES.items()})


@pytest.fixture(scope="module", params=[1, 2, 3])
def world(request):
    world_size = request.param
    return world_size, run_distributed(_rank_run, world_size)


def test_sharded_objectives_match_single_process(world):
    world_size, results = world
    *_, logits, cols, upstream = make_problem(world_size)
    onehot = F.one_hot(cols, logits.shape[1]).bool()
    z = logits.clone().requires_grad_(True)
    z_y = z[onehot]
    negatives = torch.where(onehot, float("-inf"), z)
    references = {
        "softmax": torch.logsumexp(z, dim=1) - z_y,
        "dissected": torch.log1p(torch.exp(2.0 - z_y)) + torch.log1p(torch.exp(negatives).sum(dim=1)),
        "dissected_scaled": torch.log1p(torch.exp(-1.0 - z_y)) + torch.log1p(3 * torch.exp(negatives).sum(dim=1)),
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


def reference_head(name, x, y, w, classes):
    """Mean naive loss over the global batch on the centres ``classes``; grads for x and w."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    classes = torch.as_tensor(classes)
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1, 1)[:, classes]
    labels = torch.searchsorted(classes, y)
    assert (classes[labels] == y).all()
    loss = reference_rows(name, cos, labels).mean()
    loss.backward()
    return loss.item(), x.grad, w.grad


def check_head(results, name, kind, world_size, classes):
    batches, x, y, w, *_ = make_problem(world_size)
    ref_loss, ref_gx, ref_gw = reference_head(name, x, y, w, classes)
    grad_x = np.concatenate([r[kind][name]["grad_x"] for r in results])
    grad_w = np.concatenate([r[kind][name]["grad_w"] for r in results])
    for r in results:
        assert r[kind][name]["loss"] == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), name
    np.testing.assert_allclose(grad_x, ref_gx.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(grad_w, ref_gw.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", RATE1_CASES)
def test_head_rate1_matches_single_process(world, name):
    world_size, results = world
    batches, x, y, w, *_ = make_problem(world_size)
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
    batches, x, y, w, *_ = make_problem(world_size)
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
