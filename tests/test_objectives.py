"""The row objectives on one process against naive float64 formulas (``tests/reference.py``;
sharded: see ``test_losses_distributed``)."""

from __future__ import annotations

import pytest
import torch

from partialfc.ops import Targets, dissected_softmax, softmax_cross_entropy
from partialfc.ops.objectives import RowObjective
from tests.reference import dissected_rows


def problem(seed=0, scale=10.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 11, generator=gen, dtype=torch.float64) * scale
    target = torch.randint(0, 11, (7,), generator=gen)
    return logits, target


@pytest.mark.parametrize("intra_logit,inter_scale", [(0.0, 1.0), (57.6, 1.0), (-20.0, 64.0)])
def test_dissected_matches_naive_and_gradcheck(intra_logit, inter_scale):
    logits, target = problem()
    z = logits.clone().requires_grad_(True)
    got = dissected_softmax(z, Targets.from_columns(target, z.shape[1]), intra_logit=intra_logit, inter_scale=inter_scale)
    ref_z = logits.clone().requires_grad_(True)
    ref = dissected_rows(ref_z, target, intra_logit, inter_scale)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(7, dtype=torch.float64)
    grad, = torch.autograd.grad((got * upstream).sum(), z)
    ref_grad, = torch.autograd.grad((ref * upstream).sum(), ref_z)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    small = (logits / 10).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: dissected_softmax(t, Targets.from_columns(target, t.shape[1]), intra_logit=intra_logit / 10,
                                    inter_scale=inter_scale), (small,))


def test_dissected_extreme_logits_are_finite():
    """Logits of +-64 (s=64, cos=+-1) in fp32: the naive formula overflows, ours must not."""
    logits = torch.full((3, 10 ** 5), -64.0)
    logits[1] = 64.0
    target = torch.tensor([0, 1, 2])
    logits[2, 2] = 64.0
    z = logits.clone().requires_grad_(True)
    out = dissected_softmax(z, Targets.from_columns(target, z.shape[1]), intra_logit=57.6)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    # row 1: every negative at +64 -> inter = log(1 + (n-1) e^64) ~ 64 + log(n-1)
    expected = 64.0 + torch.log(torch.tensor(10 ** 5 - 1.0)) + torch.nn.functional.softplus(torch.tensor(-6.4))
    torch.testing.assert_close(out[1], expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_upcast(dtype):
    logits, target = problem(seed=2, scale=20.0)
    half = logits.to(dtype)
    for fn in (lambda z: softmax_cross_entropy(z, Targets.from_columns(target, z.shape[1])),
               lambda z: dissected_softmax(z, Targets.from_columns(target, z.shape[1]), intra_logit=30.0)):
        out = fn(half)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(half.float()), rtol=0, atol=0)


def test_softmax_cross_entropy_unchanged():
    logits, target = problem(seed=3)
    z = logits.clone().requires_grad_(True)
    got = softmax_cross_entropy(z, Targets.from_columns(target, z.shape[1]))
    onehot = torch.nn.functional.one_hot(target, 11).bool()
    torch.testing.assert_close(got, torch.log(torch.exp(logits).sum(dim=1)) - logits[onehot], rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(grad, torch.softmax(logits, dim=1) - onehot.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", [RowObjective(), RowObjective(dissected=True, intra_logit=3.0, inter_scale=4.0)],
                         ids=["softmax", "dissected"])
def test_combine_against_naive_formulas(objective):
    """``RowObjective.combine`` (the one place both the plain and the fused path take the loss
    and its gradient factors from) against the naive float64 row objective and its autograd
    gradient: ``weight * exp(z_j - row_max)`` is ``dL/dz_j`` off the target, ``target_pull`` is
    ``dL/dz_y``."""
    logits, target = problem(seed=4, scale=3.0)
    z = logits.clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(target, 11).bool()
    if objective.dissected:
        naive = dissected_rows(z, target, objective.intra_logit, objective.inter_scale)
        included = logits.masked_fill(onehot, float("-inf"))  # the inter term: the non-targets and 0
        row_max = included.amax(dim=1).clamp_min(0.0)
    else:
        naive = torch.log(torch.exp(z).sum(dim=1)) - z[onehot]
        included = logits
        row_max = included.amax(dim=1)
    grad, = torch.autograd.grad(naive.sum(), z)
    sum_exp = torch.exp(included - row_max[:, None]).sum(dim=1)
    terms = objective.combine(row_max, sum_exp, logits[onehot])
    torch.testing.assert_close(terms.loss, naive.detach(), rtol=1e-12, atol=1e-12)
    off_target = terms.weight[:, None] * torch.exp(logits - row_max[:, None])
    torch.testing.assert_close(off_target[~onehot], grad[~onehot], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.target_pull, grad[onehot], rtol=1e-12, atol=1e-12)
