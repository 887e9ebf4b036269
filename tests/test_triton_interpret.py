"""The Triton kernels of the fused objective, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1`` is set in the spawned ranks before Triton is imported), against
the plain objective and the float64 oracle: the same cases as ``test_fused`` on 1-3 gloo
processes (every loss and gradient mode, rates 1 / 0.5 / 0, a rank without centres, up to
three column splits per row block); then a shard past CUDA's old grid limit and inputs whose
offsets do not fit int32, against the PyTorch loop."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from partialfc.ops import torch_fused
from partialfc.ops.chunking import ChunkProblem, centre_inverse_norms
from partialfc.ops.fused import fused_margin_softmax
from partialfc.ops.targets import Targets
from partialfc.testing import run_distributed
from tests import fused_helpers

pytestmark = [pytest.mark.required, pytest.mark.multiprocess,  # Triton: in the dev extra, CI installs it
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")]

CASES = fused_helpers.cases()
INTERPRET = {"TRITON_INTERPRET": "1"}
SCALE, MARGIN = 30.0, 0.35
OLD_GRID_COLUMNS = 65_535 * 64  # the old layout's last column: 64-wide tiles on grid axis 1


@pytest.fixture(scope="module", params=[1, 2, 3])
def world(request):
    return request.param, run_distributed(fused_helpers.rank_run, request.param, "triton", CASES, fused_helpers.CHUNK,
                                           INTERPRET)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_triton_matches_plain_and_reference(world, case):
    world_size, results = world
    fused_helpers.check(results, world_size, case)


def _interpreted():
    """:mod:`triton_fused` with interpreted kernels (call in a spawned rank, before Triton is imported)."""
    os.environ.update(INTERPRET)
    from partialfc.ops import triton_fused

    return triton_fused


def _excess(got, ref, rtol, atol_scale):
    """How far ``got`` lies outside ``rtol * |ref| + atol_scale * max|ref|`` (<= 0: within)."""
    got, ref = got.double(), ref.double()
    bound = rtol * ref.abs() + atol_scale * ref.abs().max()
    return ((got - ref).abs() - bound).max().item()


def _fused_step(implementation, emb, centres, col, chunk):
    """Per-row losses, ``dE`` and ``dW`` of softmax with a CosFace target logit."""
    x, w = emb.clone().requires_grad_(True), centres.clone().requires_grad_(True)
    loss = fused_margin_softmax(x, w, Targets.from_columns(col, w.shape[0]), target_logit=lambda c: SCALE * (c - MARGIN),
                                scale=SCALE, implementation=implementation, chunk_size=chunk)
    loss.backward(torch.linspace(0.5, 1.5, len(loss), dtype=loss.dtype))
    return loss.detach(), x.grad, w.grad


def _recording(module, store: list):
    """``module.row_stats`` replaced by a copy that appends its results to ``store``."""
    row_stats = module.row_stats

    def recorded(*args):
        store.append(row_stats(*args))
        return store[-1]

    module.row_stats = recorded


def _large_shard_run(rank, world_size, k, dim, batch):
    """The fused step (row stats, loss, ``dE``, ``dW``) through Triton and through the PyTorch
    loop on ``k`` float64 centres; excesses over the tolerance (see :func:`_excess`)."""
    tf = _interpreted()
    tf.INTERPRETER_CONFIG = tf.Config(batch, 65536, dim)  # 65 wide tiles to interpret, not 2^18 of 16
    tf._PROGRAMS = 4  # four splits of up to 17 tiles: the in-program walk and the cross-split sums
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    centres = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    col = torch.randint(0, k, (batch,), generator=gen)
    col[:4] = torch.tensor([-1, OLD_GRID_COLUMNS, 2 ** 22, k - 1])  # elsewhere; past the old grid; the last
    stats = {tf: [], torch_fused: []}
    steps = {}
    for module, name in ((tf, "triton"), (torch_fused, "torch")):
        _recording(module, stats[module])
        steps[name] = _fused_step(name, emb, centres, col, 2 ** 18)
    (got,), (ref,) = stats[tf], stats[torch_fused]  # one forward each: (row max, sum of exp)
    out = {f"stats_{i}": _excess(a, b, 1e-12, 0.0) for i, (a, b) in enumerate(zip(got, ref))}
    for name, a, b in zip(("loss", "grad_e", "grad_w"), steps["triton"], steps["torch"]):
        out[name] = _excess(a, b, 1e-9, 1e-12)
    return out


def test_shard_past_the_old_grid_limit_matches_the_torch_loop(monkeypatch):
    """``k = 2^22 + 64`` centres (more 64-wide tiles than CUDA's 65,535 on grid axis 1, where
    the old layout put them): forward and backward equal the PyTorch loop in float64."""
    k = 2 ** 22 + 64
    assert k > OLD_GRID_COLUMNS
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # the interpreter's small matmuls: threads only contend
    excess, = run_distributed(_large_shard_run, 1, k, 8, 8, timeout=240)
    assert all(v <= 0 for v in excess.values()), excess


def _wide_stride_run(rank, world_size, rows, stride, dim):
    """``rows`` fp16 embeddings and centres, ``stride`` elements apart in one lazily
    allocated storage: Triton's row stats and gradients against float64 copies through the
    PyTorch loop; excesses over the tolerance."""
    tf = _interpreted()
    storage = torch.empty((rows - 1) * stride + 2 * dim, dtype=torch.float16)  # untouched pages cost nothing
    emb, centres = (storage.as_strided((rows, dim), (stride, 1), offset) for offset in (0, dim))
    gen = torch.Generator().manual_seed(2)
    emb.copy_(F.normalize(torch.randn(rows, dim, generator=gen), dim=1))
    centres.copy_(torch.randn(rows, dim, generator=gen))
    col = torch.arange(rows).roll(1)
    col[0] = -1
    targets = Targets.from_columns(col, rows)
    logit = SCALE * torch.rand(len(targets.rows), generator=gen)
    inv_norm = centre_inverse_norms(centres, 8192, torch.float32)
    args = (emb, centres, inv_norm, targets, logit)
    exact_args = (emb.double(), centres.double(), inv_norm.double(), targets, logit.double())
    half, exact = (ChunkProblem(SCALE, None, False, 8192, dtype) for dtype in (torch.float16, torch.float64))
    got, ref = tf.row_stats(*args, half), torch_fused.row_stats(*exact_args, exact)
    out = {f"stats_{i}": _excess(a, b, 1e-5, 1e-6) for i, (a, b) in enumerate(zip(got, ref))}
    backward = (ref[0], ref[1].reciprocal(), torch.linspace(-1.0, 1.0, len(targets.rows), dtype=torch.float64))
    got = tf.gradients(*args, *(t.float() for t in backward), half)
    ref = torch_fused.gradients(*exact_args, *backward, exact)
    out.update({name: _excess(a, b, 2e-3, 1e-3) for name, a, b in zip(("grad_e", "grad_w"), got, ref)})
    return out


def test_offsets_past_int32_read_the_right_rows():
    """Rows ``2^28`` elements apart: row 8 starts at element ``2^31``, past int32 (an int32
    offset wraps below the storage: the rank crashes); results equal the PyTorch loop."""
    excess, = run_distributed(_wide_stride_run, 1, 9, 2 ** 28, 16, timeout=60)
    assert all(v <= 0 for v in excess.values()), excess
