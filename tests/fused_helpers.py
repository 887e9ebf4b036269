"""The head problem shared by the fused-path tests (PyTorch loop and Triton interpreter).

Each rank runs one step of a float64 head per case, once with the plain objective
(``fused="plain"``) and once with the fused path under test, with the same seed (hence the
same sampled centres); the parent compares both with each other and with the independent
oracle of ``tests/reference.py`` on the union of the sampled centres. Classes split
unevenly (37 over 2 or 3 ranks), local batches differ, and no label lives on rank 1, so at
rate 0 that rank samples no centre at all. Bounded cases run the head with ``max_batch``:
on 2 and 3 ranks the padded rows can hold more positives than the sample, so the sample is
padded with columns that take no part, and the oracle sees the live ones only.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from partialfc import PartialFC
from partialfc.head.sharding import shard_range
from partialfc.losses import build_loss
from tests.reference import SPECS, head_reference, make_problem

NUM_CLASSES, DIM = 37, 6
LOCAL_BATCHES = [5, 3, 6]
CHUNK = 3  # divides no rank's number of sampled centres here
RATES = (1.0, 0.5, 0.0)
# extra variants of the registry specs: inter-class filtering
VARIANTS = {"cosface_filtered": ("cosface", dict(inter_threshold=0.05)),
            "arcface_filtered": ("arcface", dict(inter_threshold=0.1))}
BOUND = max(LOCAL_BATCHES) + 1  # max_batch of the bounded cases
BOUNDED = [("cosface", "exact", 0.5), ("arcface_filtered", "exact", 0.5), ("dsoftmax", "exact", 0.0),
           ("dsoftmax_B", "exact", None), ("dsoftmax_K", "exact", None), ("cosface", "exact", 0.0)]


def cases(names=None) -> list[tuple[str, str, float | None, int | None]]:
    """``(case, gradient mode, rate, max_batch)`` for every spec (or ``names``) and both
    gradient modes, eager; losses that imply their own rate (D-Softmax-B/K) run at that rate
    only. Then (all specs) the :data:`BOUNDED` ones with ``max_batch``."""
    out = []
    for name in names or [*SPECS, *VARIANTS]:
        spec = SPECS[VARIANTS.get(name, (name, {}))[0]]
        implied = spec.loss == "dsoftmax" and spec.params.get("variant") in ("B", "K")
        for gradient in ("exact", "straight_through"):
            out += [(name, gradient, None, None)] if implied else [(name, gradient, r, None) for r in RATES]
    return out + ([case + (BOUND,) for case in BOUNDED] if names is None else [])


def _spec_and_params(name, gradient):
    spec, extra = VARIANTS.get(name, (name, {}))
    return SPECS[spec], {**extra, "gradient": gradient}


def head_problem(world_size):
    """``make_problem`` with labels moved off rank 1's shard (first class of the shard -> 0)."""
    batches, x, y, w = make_problem(world_size, LOCAL_BATCHES, NUM_CLASSES, DIM, seed=77, target_at_one=True)
    if world_size > 1:
        start, n = shard_range(NUM_CLASSES, world_size, 1)
        y = torch.where((y >= start) & (y < start + n), y % start, y)
    return batches, x, y, w


def _step(rank, case, fused, chunk, problem):
    name, gradient, rate, bound = case
    spec, params = _spec_and_params(name, gradient)
    batches, x, y, w = problem
    rows = slice(sum(batches[:rank]), sum(batches[:rank + 1]))
    head = PartialFC(DIM, NUM_CLASSES, loss=spec.build(build_loss, **params), sample_rate=rate,
                     dtype=torch.float64, seed=3, fused=fused, fused_chunk=chunk, max_batch=bound)
    assert head.fused == fused
    with torch.no_grad():
        head.weight.copy_(w[head.class_start: head.class_start + head.num_local])
    x_local = x[rows].clone().requires_grad_(True)
    loss = head(x_local, y[rows])
    loss.backward()
    head.check_inputs()
    sampled = torch.arange(head.num_local) if head.last_sampled is None else head.last_sampled
    index = head._last_sample[0]
    return dict(loss=loss.item(), grad_x=x_local.grad.numpy(), grad_w=head.weight.grad.to_dense().numpy(),
                sampled=(sampled + head.class_start).numpy(), a=getattr(head.loss, "a", None),
                columns=head.num_local if index is None else len(index))


def rank_run(rank, world_size, implementation, case_list, chunk=CHUNK, env=None):
    """Every case on this rank, plain and fused; ``env`` is set before anything runs (e.g.
    ``TRITON_INTERPRET=1`` before Triton is first imported)."""
    import os

    os.environ.update(env or {})
    problem = head_problem(world_size)
    return {case: (_step(rank, case, "plain", chunk, problem), _step(rank, case, implementation, chunk, problem))
            for case in case_list}


def check(results, world_size, case, rtol=1e-9):
    """Fused == plain (tight) and both == the float64 oracle on the sampled centres."""
    name, gradient = case[:2]
    spec, params = _spec_and_params(name, gradient)
    batches, x, y, w = head_problem(world_size)
    plain = [r[case][0] for r in results]
    fused = [r[case][1] for r in results]
    classes = np.concatenate([f["sampled"] for f in fused])
    if case[2] == 0.0 and world_size > 1:
        assert len(fused[1]["sampled"]) == 0, "rank 1 holds no label: at rate 0 it samples nothing"
    assert np.array_equal(classes, np.concatenate([p["sampled"] for p in plain])), case
    if case[3] is not None and world_size > 1:  # the padding columns are there, and take no part
        assert len(classes) < sum(f["columns"] for f in fused), case
    rows = partial(spec.rows, threshold=params.get("inter_threshold"),
                   straight_through=gradient == "straight_through", a=fused[0]["a"])
    ref_loss, ref_gx, ref_gw = head_reference(rows, x, y, w, np.sort(classes))
    for p, f in zip(plain, fused):
        assert f["loss"] == pytest.approx(p["loss"], rel=rtol, abs=1e-12), case
        assert f["loss"] == pytest.approx(ref_loss, rel=1e-8, abs=1e-12), case
    for key, ref in (("grad_x", ref_gx), ("grad_w", ref_gw)):
        got = np.concatenate([f[key] for f in fused])
        np.testing.assert_allclose(got, np.concatenate([p[key] for p in plain]), rtol=rtol, atol=1e-13,
                                   err_msg=f"{case} {key}")
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-8, atol=1e-11, err_msg=f"{case} {key}")
