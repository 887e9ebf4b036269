"""``Targets`` with static shapes: rows whose target lives on another rank carry a placeholder
that no objective reads, and finding the targets never waits for the device (no ``nonzero``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partialfc.losses import CosFace
from partialfc.ops import Targets, dissected_softmax, softmax_cross_entropy
from partialfc.testing.host_syncs import HostSyncCounter

SCALE = 8.0


def _problem():
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 2 - 1
    col = torch.tensor([2, -1, 0, 4, -1, 2])  # rows 1 and 4: their target is on another rank
    target_logit = SCALE * (torch.rand(6, generator=gen, dtype=torch.float64) - 0.5)
    return cos, col, target_logit


def _reference(cos, col, target_logit):
    """Per-row softmax cross-entropy of one rank of a sharded row, in plain PyTorch: a local
    target's logit replaced by ``target_logit``; a row whose target is elsewhere has no target
    term here (the other rank's target logit is 0 in this rank's share of the SUM)."""
    losses = []
    for i, c in enumerate(col.tolist()):
        z = SCALE * cos[i]
        if c >= 0:
            z = torch.cat([z[:c], target_logit[i:i + 1], z[c + 1:]])
        losses.append(torch.logsumexp(z, 0) - (target_logit[i] if c >= 0 else 0.0))
    return torch.stack(losses)


def test_shapes_are_static_and_placeholders_inert():
    cos, col, target_logit = _problem()
    targets = Targets.from_columns(col, cos.shape[1])
    assert targets.rows.tolist() == list(range(6)) and targets.cols.tolist() == [2, 0, 0, 4, 0, 2]
    assert targets.local.tolist() == [c >= 0 for c in col.tolist()]
    got_cos, got_logit = cos.clone().requires_grad_(True), target_logit.clone().requires_grad_(True)
    got = softmax_cross_entropy(got_cos, targets, scale=SCALE, target_logit=got_logit)
    ref_cos, ref_logit = cos.clone().requires_grad_(True), target_logit.clone().requires_grad_(True)
    ref = _reference(ref_cos, col, ref_logit)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * upstream).sum(), (got_cos, got_logit))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (ref_cos, ref_logit))
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # the placeholders (rows 1 and 4) may hold anything, NaN included: nothing changes
    poisoned = target_logit.clone()
    poisoned[col < 0] = float("nan")
    again = softmax_cross_entropy(cos, targets, scale=SCALE, target_logit=poisoned)
    torch.testing.assert_close(again, got.detach(), rtol=0, atol=0)
    dissected = [dissected_softmax(cos, targets, intra_logit=2.0, scale=SCALE, target_logit=t)
                 for t in (target_logit, poisoned)]
    torch.testing.assert_close(dissected[1], dissected[0], rtol=0, atol=0)
    assert torch.isfinite(dissected[0]).all()


def test_a_rank_without_columns_has_no_target_rows():
    targets = Targets.from_columns(torch.full((4,), -1), 0)
    assert targets.rows.numel() == 0 and targets.cols.numel() == 0
    loss = softmax_cross_entropy(torch.zeros(4, 0, dtype=torch.float64), targets)
    assert loss.shape == (4,)


@pytest.mark.parametrize("fused", [False, True])
def test_finding_and_using_targets_waits_for_nothing(fused):
    """What ``nonzero`` did (a host synchronisation on CUDA) is now a mask: building the targets
    and a margin loss's forward and backward over them, plain and fused, count no host sync
    and give the same losses."""
    cos, col, _ = _problem()
    gen = torch.Generator().manual_seed(4)
    emb = F.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
    centres = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = CosFace(s=SCALE, m=0.2)
    with HostSyncCounter() as counted:
        targets = Targets.from_columns(col, centres.shape[0])
        if fused:
            out = loss.fused(emb, centres, targets, chunk_size=2)
        else:
            out = loss(F.linear(emb, F.normalize(centres, dim=1)), targets)
        out.sum().backward()
    assert counted.sync_sites == {}, counted.sync_sites
    cos = F.linear(emb.detach(), F.normalize(centres.detach(), dim=1))
    z = SCALE * cos.clone()
    expected = []
    for i, c in enumerate(col.tolist()):
        if c >= 0:
            z[i, c] = SCALE * (cos[i, c] - 0.2)
        expected.append(torch.logsumexp(z[i], 0) - (z[i, c] if c >= 0 else 0.0))
    torch.testing.assert_close(out.detach(), torch.stack(expected), rtol=1e-10, atol=1e-10)
