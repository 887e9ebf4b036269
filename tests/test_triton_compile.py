"""What the Triton kernels need on CUDA, checked without a GPU: compiled ahead of time for
sm_90 (H100/H200) at the tiles the host picks, they spill no registers and multiply index
tensors in int64 only; the grid's axes stay within CUDA's limits at 10^7 centres; each
launch goes to the tensors' device."""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")  # in the dev extra: CI installs it

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from partialfc.ops import triton_fused  # noqa: E402
from partialfc.ops.chunking import ChunkProblem  # noqa: E402
from partialfc.ops.targets import Targets  # noqa: E402

pytestmark = pytest.mark.required

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# (matmul dtype, centres' dtype): autocast over fp32 or bf16 centres, fp32, fp64
DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
          (torch.float32, torch.float32), (torch.float64, torch.float64)]
KERNELS = [pytest.param("_row_stats_kernel", {}, id="row_stats"),
           pytest.param("_gradients_kernel", {"COMPUTE_DW": True}, id="gradients"),
           pytest.param("_gradients_kernel", {"COMPUTE_DW": False}, id="gradients_frozen_centres")]
INTEGERS = {"B", "K", "D", "cols_per_split", "stride_e", "stride_w"}
ALIGNED = {"D", "stride_e", "stride_w", "cols_per_split"}  # multiples of 16 at D = 512: Triton marks them so


def _signature(fn, compute, centres, constexprs):
    """Argument types of ``fn`` as the host launches it: sizes and strides int32, ``scale``
    and ``threshold`` fp32, the rest pointers (the embeddings in ``compute``, the centres in
    ``centres``, the target columns int32, the live columns int8, the others in the
    accumulation dtype)."""
    acc = "fp64" if compute == torch.float64 else "fp32"
    pointers = {"E": TYPE_NAMES[compute], "W": TYPE_NAMES[centres], "TCOL": "i32", "LIVE": "i8"}

    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in INTEGERS:
            return "i32"
        return "fp32" if name in ("scale", "threshold") else "*" + pointers.get(name, acc)

    return {name: kind(name) for name in fn.arg_names}


def _compile_sm90(fn, signature, constexprs, num_warps):
    """``(registers, stack bytes, TTIR)`` of ``fn`` compiled for sm_90 (no device needed)."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in ALIGNED}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return registers, stack, kernel.asm["ttir"]


@pytest.fixture(scope="module")
def compilable():
    """Skip where this process interprets Triton (``TRITON_INTERPRET=1``) or lacks its CUDA backend."""
    if not isinstance(triton_fused._row_stats_kernel, triton.runtime.JITFunction):
        pytest.skip("Triton runs interpreted in this process (TRITON_INTERPRET=1): nothing to compile")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend")


@pytest.mark.parametrize("kernel, extra", KERNELS)
@pytest.mark.parametrize("compute, centres", DTYPES, ids=lambda d: TYPE_NAMES[d])
def test_kernels_compile_for_sm90_without_spills(compilable, kernel, extra, compute, centres):
    """Every flag combination at the host's CUDA tiles: no stack frame (spilled registers
    live there), and no int32 tensor product in the TTIR (a row or column index times a
    stride in int32 wraps past 2^31 elements)."""
    fn = getattr(triton_fused, kernel)
    cfg = triton_fused.CUDA_CONFIGS[compute]
    no_target = torch.full((4,), -1)
    for threshold, exclude_target, columns in itertools.product((None, 0.2), (False, True), (None, no_target >= 0)):
        targets = Targets.from_columns(no_target, 4, columns)
        flags = triton_fused._flags(ChunkProblem(30.0, threshold, exclude_target, 8192, compute), targets)
        meta = {**triton_fused._meta(cfg, flags), **extra}
        num_warps = meta.pop("num_warps")
        registers, stack, ttir = _compile_sm90(fn, _signature(fn, compute, centres, meta), meta, num_warps)
        where = f"{kernel} {extra} {cfg} threshold={threshold} exclude_target={exclude_target} {flags}"
        assert stack == 0, f"{where}: {registers} registers, {stack} bytes of stack (spills)"
        assert not re.findall(r"arith\.muli .*: tensor<[0-9x]+xi32>", ttir), f"{where}: int32 offsets"


@pytest.mark.parametrize("k", [10 ** 7, 2 ** 22 + 64, 65, 1])
@pytest.mark.parametrize("batch", [1, 512, 8192])
@pytest.mark.parametrize("compute", list(triton_fused.CUDA_CONFIGS), ids=lambda d: TYPE_NAMES[d])
def test_grid_covers_every_column_within_cudas_limits(k, batch, compute):
    """Splits on axis 0 (whole tiles, each non-empty, together every column), row blocks on
    axis 1 (<= 65,535), about ``_PROGRAMS`` programs. At both large ``k`` the old layout
    (64-wide column tiles on axis 1) broke the limit."""
    cfg = triton_fused.CUDA_CONFIGS[compute]
    cols_per_split, (splits, row_blocks) = triton_fused._grid(k, batch, cfg)
    assert splits <= 2 ** 31 - 1 and row_blocks == triton.cdiv(batch, cfg.block_b) <= triton_fused.GRID_AXIS_LIMIT
    assert cols_per_split % cfg.block_k == 0
    assert (splits - 1) * cols_per_split < k <= splits * cols_per_split
    assert splits <= max(1, triton_fused._PROGRAMS // row_blocks)


def test_grid_refuses_more_row_blocks_than_cuda_allows():
    cfg = triton_fused.CUDA_CONFIGS[torch.bfloat16]
    triton_fused._grid(100, triton_fused.GRID_AXIS_LIMIT * cfg.block_b, cfg)
    with pytest.raises(ValueError, match="grid axis 1"):
        triton_fused._grid(100, triton_fused.GRID_AXIS_LIMIT * cfg.block_b + 1, cfg)


def test_launch_switches_to_the_tensors_cuda_device(monkeypatch):
    """``torch.cuda.device(cuda:1)`` is entered around the launch; off CUDA nothing is."""
    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield
        entered.append(None)

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta, list(entered)))

    monkeypatch.setattr(torch.cuda, "device", device)
    triton_fused._launch(Kernel(), (3, 1), torch.device("cuda", 1), "arg", BLOCK_B=16)
    assert launched == [((3, 1), ("arg",), {"BLOCK_B": 16}, [torch.device("cuda", 1)])]
    assert entered == [torch.device("cuda", 1), None]
    triton_fused._launch(Kernel(), (3, 1), torch.device("cpu"), "arg")
    assert len(launched) == 2 and len(entered) == 2


def test_both_passes_launch_on_the_embeddings_device(monkeypatch):
    devices = []
    monkeypatch.setattr(triton_fused, "_launch", lambda kernel, grid, device, *args, **meta: devices.append(device))
    emb, centres = torch.zeros(4, 16), torch.ones(20, 16)
    targets = Targets.from_columns(torch.tensor([0, -1, 3, 19]), 20)
    p = ChunkProblem(30.0, None, False, 8, torch.float32)
    ones = torch.ones(4)
    triton_fused.row_stats(emb, centres, torch.ones(20), targets, ones, p)
    triton_fused.gradients(emb, centres, torch.ones(20), targets, ones, ones, ones, ones, p)
    assert devices == [emb.device, emb.device]
