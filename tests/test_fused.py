"""The fused, chunked objective (PyTorch loop) against the plain objective and the float64
oracle: every registered loss, both gradient modes, rates 1 / 0.5 / 0, 1-3 gloo processes
(uneven class splits and batches, a rank without centres), chunks that divide nothing;
bf16 autocast within the plain path's own bf16 error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from partialfc import PartialFC
from partialfc.losses import build_loss
from partialfc.ops import Targets
from partialfc.ops.implementation import Implementation
from partialfc.testing import run_distributed
from tests import fused_helpers
from tests.reference import SPECS, head_reference

CASES = fused_helpers.cases()


@pytest.fixture(scope="module", params=[1, 2, 3])
def world(request):
    return request.param, run_distributed(fused_helpers.rank_run, request.param, "torch", CASES)


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_torch_matches_plain_and_reference(world, case):
    world_size, results = world
    fused_helpers.check(results, world_size, case)


def _cos_problem(seed, b=9, k=23, d=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=dtype)
    w = torch.randn(k, d, generator=gen, dtype=dtype)
    col = torch.randint(0, k, (b,), generator=gen)
    col[::4] = -1  # some targets live on another rank
    return x, w, col


def _plain(loss, x, w, targets):
    cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
    with torch.no_grad():
        cos.clamp_(-1.0, 1.0)
    return loss(cos, targets)


@pytest.mark.parametrize("chunk", [1, 5, 23, 1000])
@pytest.mark.parametrize("name", ["arcface", "dsoftmax_K_rescaled", "x2"])
def test_chunk_sizes(name, chunk):
    """Any chunk size gives the plain loss and gradients (targets on other ranks included)."""
    x, w, col = _cos_problem(1)
    loss = SPECS[name].build(build_loss)
    targets = Targets.from_columns(col, w.shape[0])
    upstream = torch.rand(x.shape[0], dtype=torch.float64)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = _plain(loss, xs, ws, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (xs, ws))
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = loss.fused(F.normalize(xf, dim=1), wf, targets, chunk_size=chunk)
    grads = torch.autograd.grad((got * upstream).sum(), (xf, wf))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


class _HostSyncOps(TorchDispatchMode):
    """Records the aten ops that copy to the host on CUDA (a data-dependent shape: nonzero,
    boolean-mask indexing, masked_select, unique; or a scalar read: item)."""

    SYNCING = {"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default",
               "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}
    INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.SYNCING or (name in self.INDEXING and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, extra", [("arcface", {}), ("dsoftmax", {}), ("cosface", dict(inter_threshold=0.1))])
def test_torch_chunk_walk_has_no_host_sync(name, extra):
    """The fused PyTorch loop (forward and backward, several chunks, targets on other ranks)
    runs no op that would synchronise with the host on CUDA: its sync count per head step
    (docs/gpu.md) does not grow with the number of chunks."""
    x, w, col = _cos_problem(5)
    loss = build_loss(name, **extra)
    targets = Targets.from_columns(col, w.shape[0])
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    emb = F.normalize(xs, dim=1)
    with _HostSyncOps() as ops:
        loss.fused(emb, ws, targets, chunk_size=5).sum().backward()
    assert ops.found == []


def test_default_is_fused_and_matches_reference():
    """The default head runs the fused PyTorch path, and it equals the float64 oracle."""
    x, w, _ = _cos_problem(2, b=12, k=29)
    y = torch.randint(0, 29, (12,), generator=torch.Generator().manual_seed(0))
    spec = SPECS["cosface"]
    head = PartialFC(16, 29, loss=spec.build(build_loss), dtype=torch.float64)
    assert head.fused == "torch"
    with torch.no_grad():
        head.weight.copy_(w)
    xs = x.clone().requires_grad_(True)
    loss = head(xs, y)
    loss.backward()
    ref_loss, ref_gx, ref_gw = head_reference(spec.rows, x, y, w)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(xs.grad, ref_gx, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(head.weight.grad, ref_gw, rtol=1e-10, atol=1e-13)


class _NotAMarginLoss(nn.Module):
    def forward(self, cos, targets, group=None):
        return -cos[targets.rows, targets.cols]


@pytest.mark.parametrize("choice", list(Implementation))
def test_every_implementation_is_a_head_switch_value(choice):
    """Each member, its name and its name in capitals configure the head; ``head.fused`` is
    the resolved member (``auto``: ``torch`` for a margin loss)."""
    resolved = Implementation.torch if choice is Implementation.auto else choice
    for value in (choice, choice.value, choice.value.upper()):
        head = PartialFC(4, 10, fused=value)
        assert type(head.fused) is Implementation and head.fused is resolved


def test_fused_switch_values():
    assert PartialFC(4, 10, fused=False).fused is Implementation.plain
    assert PartialFC(4, 10, fused=True).fused is Implementation.torch
    assert PartialFC(4, 10, loss=_NotAMarginLoss()).fused is Implementation.plain  # auto: plain for any other loss
    for bad in ("cuda", "", None, 1):
        with pytest.raises(ValueError, match="fused must be one of") as raised:
            PartialFC(4, 10, fused=bad)
        message = str(raised.value)
        assert "\n" not in message and all(c.value in message for c in Implementation), message
    with pytest.raises(ValueError, match="needs a MarginLoss"):
        PartialFC(4, 10, loss=_NotAMarginLoss(), fused=Implementation.torch)


@pytest.mark.parametrize("name", ["cosface", "arcface", "dsoftmax"])
def test_bf16_autocast_error_bounded_by_plain_bf16_error(name):
    """ml-cross-entropy's test: under bf16 autocast the fused path's error against fp32 is
    at most a small multiple of the plain path's own bf16 error (fp32 accumulation)."""
    x, w, col = _cos_problem(3, b=64, k=3000, d=128, dtype=torch.float32)
    loss = SPECS[name].build(build_loss)
    targets = Targets.from_columns(col, w.shape[0])

    def run(fused, autocast):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss.fused(F.normalize(xs, dim=1), ws, targets, chunk_size=512) if fused else _plain(loss, xs, ws, targets)
        out.sum().backward()
        assert out.dtype == torch.float32 and xs.grad.dtype == ws.grad.dtype == torch.float32
        return out.detach(), xs.grad, ws.grad

    exact = run(False, False)
    torch.testing.assert_close(run(True, False), exact, rtol=1e-4, atol=2e-5)  # fp32: same up to rounding
    plain_bf16, fused_bf16 = run(False, True), run(True, True)
    for what, e, p, f in zip(("loss", "grad_x", "grad_w"), exact, plain_bf16, fused_bf16):
        plain_err, fused_err = (p - e).abs().max().item(), (f - e).abs().max().item()
        assert plain_err > 0, what  # the bound is not vacuous: bf16 did round
        assert fused_err <= 2.0 * plain_err, f"{what}: fused {fused_err:.3g} vs plain {plain_err:.3g}"


def test_fused_rejects_unknown_implementation():
    """The op runs the chunk walks only: ``torch`` and ``triton`` (members or names)."""
    x, w, col = _cos_problem(4)
    loss, emb, targets = build_loss("cosface"), F.normalize(x, dim=1), Targets.from_columns(col, w.shape[0])
    expected = loss.fused(emb, w, targets)
    for good in ("torch", "Torch"):
        torch.testing.assert_close(loss.fused(emb, w, targets, implementation=good), expected, rtol=0, atol=0)
    for bad in ("cuda", Implementation.plain, Implementation.auto):
        with pytest.raises(ValueError, match="fused implementation must be one of torch, triton, got"):
            loss.fused(emb, w, targets, implementation=bad)



@pytest.mark.parametrize("chunk", [0, -1])
def test_chunk_size_below_one_is_refused(chunk):
    """A chunk of 0 or fewer centres is an error (it used to mean the default, or to skip
    every centre and return NaN), at construction and at the call."""
    x, w, col = _cos_problem(4)
    with pytest.raises(ValueError, match="chunk"):
        build_loss("cosface").fused(F.normalize(x, dim=1), w, Targets.from_columns(col, w.shape[0]), chunk_size=chunk)
    with pytest.raises(ValueError, match="fused_chunk"):
        PartialFC(4, 10, fused_chunk=chunk)


@pytest.mark.parametrize("name", ["arcface", "dsoftmax", "x2"])
def test_fused_loss_without_autograd(name):
    """Under ``torch.inference_mode()`` and ``torch.no_grad()`` (a validation loss) the fused
    path gives the plain loss; it used to fail taking psi's slope by autograd."""
    x, w, col = _cos_problem(6)
    loss = SPECS[name].build(build_loss)
    targets = Targets.from_columns(col, w.shape[0])
    ref = _plain(loss, x, w, targets)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            got = loss.fused(F.normalize(x, dim=1), w, targets, chunk_size=5)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["arcface", "dsoftmax"])
def test_frozen_centres_get_no_gradient(name):
    """Centres that need no gradient get none (dW is not computed), and the embeddings'
    gradient is the one they get when the centres are trained."""
    x, w, col = _cos_problem(7)
    loss, targets = build_loss(name), Targets.from_columns(col, w.shape[0])
    grads = []
    for trained in (True, False):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(trained)
        loss.fused(F.normalize(xs, dim=1), ws, targets, chunk_size=5).sum().backward()
        assert (ws.grad is not None) == trained
        grads.append(xs.grad)
    assert torch.equal(grads[0], grads[1])
