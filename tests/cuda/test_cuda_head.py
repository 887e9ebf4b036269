"""CUDA tier: the head on a GPU against the float64 CPU oracle of ``tests/reference.py``.

Every registered loss (``SPECS``), both gradient modes, rates 1, 0.1 and 0, each path of
the head (every ``Implementation`` but ``auto`` as ``fused=``); bf16 and fp16 autocast
within the CPU tests' 2% bound; the host synchronisations of one head step counted; the head under a
real NCCL process group of world size 1.
"""

from __future__ import annotations

import pytest
import torch

from partialfc import PartialFC
from partialfc.losses import ArcFace, CosFace, build_loss
from partialfc.testing import run_distributed
from tests.cuda.helpers import CUDA_TIER, count_syncs, head_variants
from tests.reference import SPECS, head_reference, make_problem

pytestmark = CUDA_TIER

NUM_CLASSES, DIM, BATCH = 1000, 32, 24  # BATCH < 0.1 * NUM_CLASSES: the sync-free draw
RATES = [1.0, 0.1, 0.0]
GRADIENTS = ["exact", "straight_through"]


def _loss_and_rate(name: str, gradient: str, rate: float):
    """``(spec, library loss, head rate)`` of ``SPECS[name]`` (at its own scale: Search-
    Softmax's margin depends on it); a loss that implies its own rate (D-Softmax-B/K) gets
    ``None``: the head takes the loss's rate."""
    spec = SPECS[name]
    loss = spec.build(build_loss, gradient=gradient)
    return spec, loss, (None if getattr(loss, "sample_rate", None) is not None else rate)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def run_head(loss, rate, variant: dict, device, group=None):
    """One float64 head step on ``device`` over the problem of ``make_problem``; returns
    (loss, grad x, grad w, sampled global classes or None), all on the CPU."""
    _, x, y, w = make_problem(1, [BATCH], NUM_CLASSES, DIM, seed=1234)
    head = PartialFC(DIM, NUM_CLASSES, loss=loss, sample_rate=rate, process_group=group, seed=7,
                     dtype=torch.float64, device=device, **variant)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.to(device).requires_grad_(True)
    out = head(x, y.to(device))
    out.backward()
    sampled = None if head.last_sampled is None else head.last_sampled.cpu()
    return out.item(), x.grad.cpu(), _dense(head.weight.grad).cpu(), sampled


def check_against_reference(spec, loss, gradient, result):
    value, grad_x, grad_w, sampled = result
    _, x, y, w = make_problem(1, [BATCH], NUM_CLASSES, DIM, seed=1234)
    a = getattr(loss, "a", None)  # random_softmax: the drawn a

    def rows(cos, labels):
        return spec.rows(cos, labels, straight_through=gradient == "straight_through", a=a)

    ref, ref_x, ref_w = head_reference(rows, x, y, w, sampled)
    assert value == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-6, atol=1e-12)
    if sampled is not None:  # the sparse gradient holds the sampled rows only
        assert set(grad_w.abs().sum(dim=1).nonzero().flatten().tolist()) <= set(sampled.tolist())
        assert set(y.tolist()) <= set(sampled.tolist())


@pytest.mark.parametrize("variant", head_variants())
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_head_matches_float64_reference(name, gradient, rate, variant):
    spec, loss, head_rate = _loss_and_rate(name, gradient, rate)
    if head_rate is None and rate != RATES[0]:
        pytest.skip(f"{name} samples at its own rate {loss.sample_rate}: run once")
    check_against_reference(spec, loss, gradient, run_head(loss, head_rate, variant, "cuda"))


@pytest.mark.parametrize("variant", head_variants())
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rate", [1.0, 0.2])
def test_autocast_close_to_fp32(rate, amp, variant):
    """The CPU bound (tests/test_head_inputs.py): loss within 2% of fp32 at s=64; finite
    gradients in the embeddings' dtype."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    head = PartialFC(128, 2000, loss=ArcFace(), sample_rate=rate, device="cuda", **variant)
    x = torch.randn(64, 128, device="cuda", generator=gen)
    y = torch.randint(0, 2000, (64,), device="cuda", generator=gen)
    state = head.sampler.generator.get_state()
    ref = head(x, y)
    head.sampler.generator.set_state(state)
    low_x = x.to(amp).requires_grad_(True)
    with torch.autocast("cuda", dtype=amp):
        low = head(low_x, y)
    low.backward()
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=0.02)
    assert low_x.grad.dtype == amp and torch.isfinite(low_x.grad).all()


# Host synchronisations of one head step (forward + backward) on one process:
# - rate 1, and rate < 1 while the global batch is smaller than the sample: ONE, the
#   device->host copy of the validation vector (shapes, label range, finiteness);
# - rate 0 (or a batch at least as large as the sample): + torch.unique of the positives
#   and its boolean mask (their count sets the sample size): three.
# The sparse-row optimizers' step coalesces the sparse gradient (one more), outside this count.
SYNCS_PER_STEP = {1.0: 1, 0.1: 1, 0.0: 3}


def _head_step_syncs(rate: float, **options) -> list[str]:
    """The synchronisations of one forward + backward of a 10^5-class head on 256 rows,
    after a warm-up step (lazy CUDA initialisation, cuBLAS handles, is not per step)."""
    head = PartialFC(128, 100_000, loss=CosFace(), sample_rate=rate, device="cuda", **options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 128, device="cuda", generator=gen, requires_grad=True)
    y = torch.randint(0, 100_000, (256,), device="cuda", generator=gen)

    def step():
        x.grad = head.weight.grad = None
        head(x, y).backward()

    step()
    syncs = count_syncs(step)
    if head.max_batch is not None:
        head.check_inputs()  # read after the count, as the trainer's one read does
    return syncs


@pytest.mark.parametrize("variant", head_variants())
@pytest.mark.parametrize("rate", list(SYNCS_PER_STEP))
def test_host_syncs_per_head_step(rate, variant):
    syncs = _head_step_syncs(rate, **variant)
    assert len(syncs) <= SYNCS_PER_STEP[rate], syncs


@pytest.mark.parametrize("rate", list(SYNCS_PER_STEP))
def test_a_bounded_head_step_waits_for_nothing(rate):
    """The trainer's head (``max_batch``): no host synchronisation at any rate, rate 0's
    padded sample included; its input check is read afterwards, outside the count."""
    assert _head_step_syncs(rate, max_batch=256) == []


def _nccl_rank(rank, world_size, name):
    import torch.distributed as dist

    spec, loss, rate = _loss_and_rate(name, "exact", 0.1)
    torch.cuda.set_device(rank)
    assert dist.get_backend() == "nccl"
    return run_head(loss, rate, {}, f"cuda:{rank}", group=dist.group.WORLD)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["arcface", "dsoftmax_K"])
def test_head_under_nccl_world_of_one(name):
    """A real NCCL default group of one rank (a single GPU cannot hold two NCCL ranks)."""
    result = run_distributed(_nccl_rank, 1, name, backend="nccl")[0]
    spec, loss, _ = _loss_and_rate(name, "exact", 0.1)
    check_against_reference(spec, loss, "exact", result)
