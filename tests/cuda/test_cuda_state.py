"""CUDA tier: the sampler's CUDA generator across checkpoints and device types, and the
sparse-row optimizers on the GPU against the same steps on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from partialfc import PartialFC, SparseRowAdamW, SparseRowSGD
from partialfc.head import CentreSampler
from tests.cuda.helpers import CUDA_TIER

pytestmark = CUDA_TIER

POSITIVES = torch.tensor([3, 17, 250])


def draws(sampler: CentreSampler, n: int, device) -> list[torch.Tensor]:
    return [sampler.sample(POSITIVES.to(device)).cpu() for _ in range(n)]


def test_cuda_stream_is_reproducible_and_keeps_positives():
    first, again = CentreSampler(1000, 0.1, seed=4, rank=1, device="cuda"), CentreSampler(1000, 0.1, seed=4, rank=1, device="cuda")
    got = draws(first, 3, "cuda")
    assert first.generator.device.type == "cuda"
    assert all(torch.equal(a, b) for a, b in zip(got, draws(again, 3, "cuda")))
    assert not torch.equal(got[0], got[1])
    for index in got:
        assert len(index) == 100 and set(POSITIVES.tolist()) <= set(index.tolist())
        assert torch.equal(index, index.sort().values) and len(index.unique()) == 100


def test_cuda_state_saved_and_restored_through_the_head():
    head = PartialFC(16, 1000, sample_rate=0.1, seed=3, device="cuda")
    x, y = torch.randn(8, 16, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    head(x, y)
    state = head.state_dict()
    head(x, y)
    expected = head.last_sampled.clone()
    other = PartialFC(16, 1000, sample_rate=0.1, seed=99, device="cuda")
    other.load_state_dict(state)
    other(x, y)
    assert torch.equal(other.last_sampled, expected)


def test_resume_on_cpu_and_back_on_cuda():
    """CUDA (Philox) and CPU (Mersenne twister) states cannot be exchanged: each move
    re-seeds at the saved draw count, the same way every time."""
    on_gpu = CentreSampler(1000, 0.1, seed=4, rank=0, device="cuda")
    draws(on_gpu, 2, "cuda")
    saved = on_gpu.state_dict()
    assert saved["device_type"] == "cuda" and saved["draws"] == 2
    cpu_a, cpu_b = CentreSampler(1000, 0.1, seed=4, rank=0), CentreSampler(1000, 0.1, seed=4, rank=0)
    cpu_a.load_state_dict(saved)
    cpu_b.reseed(2)
    on_cpu = draws(cpu_a, 2, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, draws(cpu_b, 2, "cpu")))
    back_a = CentreSampler(1000, 0.1, seed=4, rank=0, device="cuda")
    back_b = CentreSampler(1000, 0.1, seed=4, rank=0, device="cuda")
    back_a.load_state_dict(cpu_a.state_dict())
    back_b.reseed(4)
    assert back_a.draws == 4
    assert all(torch.equal(a, b) for a, b in zip(draws(back_a, 2, "cuda"), draws(back_b, 2, "cuda")))


def test_batch_draw_is_the_positives_draw_on_cuda():
    local = torch.randint(-300, 1300, (64,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    a, b = CentreSampler(1000, 0.1, seed=1, rank=0, device="cuda"), CentreSampler(1000, 0.1, seed=1, rank=0, device="cuda")
    positives = torch.unique(local[(local >= 0) & (local < 1000)])
    assert torch.equal(a.sample_batch(local), b.sample(positives))


OPTIMIZERS = {
    "sgd": (SparseRowSGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (SparseRowSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw": (SparseRowAdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)),
}


def sparse_grads(steps: int, rows: int, dim: int) -> list[torch.Tensor]:
    """Sparse COO gradients over random row subsets (uncoalesced: repeated rows summed)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        index = torch.randint(0, rows, (rows // 5,), generator=gen)
        values = torch.randn(len(index), dim, generator=gen, dtype=torch.float64)
        out.append(torch.sparse_coo_tensor(index[None], values, (rows, dim)))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_row_optimizers_on_cuda_equal_cpu(name):
    cls, kw = OPTIMIZERS[name]
    weight = torch.nn.Parameter(torch.randn(300, 16, dtype=torch.float64))
    on_gpu = torch.nn.Parameter(weight.detach().clone().cuda())
    opt_cpu, opt_gpu = cls([weight], **kw), cls([on_gpu], **kw)
    untouched = torch.ones(300, dtype=torch.bool)
    for grad in sparse_grads(5, 300, 16):
        untouched[grad.coalesce().indices()[0]] = False
        weight.grad, on_gpu.grad = grad.clone(), grad.cuda()
        before = on_gpu.detach().clone()
        opt_cpu.step()
        opt_gpu.step()
        torch.testing.assert_close(on_gpu.detach().cpu(), weight.detach(), rtol=1e-12, atol=1e-14)
        rows = grad.coalesce().indices()[0].cuda()
        unsampled = torch.ones(300, dtype=torch.bool, device="cuda")
        unsampled[rows] = False
        assert torch.equal(on_gpu.detach()[unsampled], before[unsampled])
    for key, value in opt_cpu.state[weight].items():
        torch.testing.assert_close(copy.deepcopy(opt_gpu.state[on_gpu][key]).cpu(), value, rtol=1e-12, atol=1e-14)
        assert not value[untouched].any(), key  # rows never sampled hold no state


def test_centres_are_drawn_on_the_gpu_and_shard_alike():
    """A shard drawn on the GPU (no host copy) is the same slice of the global matrix whatever
    the split, as on the CPU."""
    from partialfc.head.partial_fc import init_centres

    full = init_centres(0, 100_000, 4, 0.01, seed=3, device="cuda")
    part = init_centres(60_000, 10_000, 4, 0.01, seed=3, device="cuda")  # straddles an init block
    assert full.device.type == part.device.type == "cuda"
    assert torch.equal(part, full[60_000:70_000])
    assert PartialFC(4, 1000, device="cuda").weight.device.type == "cuda"
