"""Every collective goes through ``partialfc.ops.collectives``, which hands the backend its
tensors on the group's device: the class of crash "host tensor given to an NCCL group" is
ruled out by construction, and each layer of that construction is tested here.

1. No module outside ``ops/collectives.py`` calls a ``torch.distributed`` collective (the
   source is read with ``ast``; the detector is itself tested on the calls that crashed).
2. With an NCCL-like backend (a fake that refuses any tensor not on ``cuda:0``, as NCCL
   does, run under ``FakeTensorMode`` so that CUDA tensors exist on a CPU-only machine),
   host tensors given to every wrapper reach the backend on the GPU and come back on the host.
3. On real gloo processes the wrappers compute what a plain reference computes, and a world
   of one with ``PARTIALFC_ALWAYS_COMMUNICATE=1`` (every collective run, no single-process
   shortcut) trains and evaluates bit for bit like the shortcut path.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import partialfc
from partialfc import dist as pdist
from partialfc.ops import collectives as coll
from partialfc.testing.multiprocess import run_distributed
from partialfc.train.config import load_config
from tests.train_helpers import tiny_overrides

ROOT = Path(partialfc.__file__).parent
HOME = ROOT / "ops" / "collectives.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
               "monitored_barrier", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv"}


def collective_calls(source: str, filename: str = "<src>") -> list[str]:
    """``file:line name`` of every ``torch.distributed`` collective called (or imported by name)
    in ``source``: through ``torch.distributed.x``, an alias of it (``import torch.distributed as
    dist``, ``from torch import distributed``), or ``from torch.distributed import x``."""
    tree = ast.parse(source, filename)
    aliases = set()
    found = []

    def other_api(module: str) -> bool:  # functional collectives, torch.distributed.nn
        return module.startswith("torch.distributed.") and ("collectives" in module or ".nn" in module)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
            found += [f"{filename}:{node.lineno} {a.name}" for a in node.names if other_api(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [f"{filename}:{node.lineno} {a.name}" for a in node.names if a.name in COLLECTIVES]
            found += [f"{filename}:{node.lineno} {node.module}"] if other_api(node.module) else []

    def is_dist(value) -> bool:
        return (isinstance(value, ast.Name) and value.id in aliases) or (
            isinstance(value, ast.Attribute) and value.attr == "distributed"
            and isinstance(value.value, ast.Name) and value.value.id == "torch")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and is_dist(node.value):
            found.append(f"{filename}:{node.lineno} {node.attr}")
    return found


def test_the_detector_finds_the_calls_that_crashed_under_nccl():
    trainer_before = ("import torch\nbad = torch.tensor([0.0])\ntorch.distributed.all_reduce(bad)\n")
    verification_before = ("import torch.distributed as dist\ndist.all_reduce(dim, op=dist.ReduceOp.MAX)\n")
    others = ("from torch import distributed as d\nfrom torch.distributed import barrier\nd.broadcast(t, 0)\n"
              "import torch.distributed._functional_collectives as fc\n")
    assert collective_calls(trainer_before) == ["<src>:3 all_reduce"]
    assert collective_calls(verification_before) == ["<src>:2 all_reduce"]
    assert sorted(collective_calls(others)) == sorted(
        ["<src>:2 barrier", "<src>:3 broadcast", "<src>:4 torch.distributed._functional_collectives"])
    # process-group bookkeeping is not a collective
    assert collective_calls("import torch.distributed as dist\ndist.new_group([0]); dist.get_rank()\n") == []


def test_no_module_outside_ops_collectives_calls_a_collective():
    calls = [c for path in sorted(ROOT.rglob("*.py")) if path != HOME
             for c in collective_calls(path.read_text(), str(path.relative_to(ROOT.parent)))]
    assert calls == [], "call partialfc.ops.collectives instead (it moves tensors to the group's device):\n" + \
        "\n".join(calls)


# ----------------------------------------------------------------- an NCCL-like backend


class FakeNccl:
    """Stands in for the raw ``torch.distributed`` collectives of a 2-rank NCCL group on
    ``cuda:0``: refuses any tensor elsewhere with NCCL's message and records the call (fake
    tensors hold no data: nothing is computed)."""

    def __init__(self):
        self.seen: list[str] = []

    def _check(self, name, *tensors):
        for t in tensors:
            if t.device != torch.device("cuda", 0):
                raise RuntimeError(f"{name}: No backend type associated with device type {t.device.type}")
        self.seen.append(name)

    def all_reduce(self, t, op=None, group=None):
        self._check("all_reduce", t)

    def broadcast(self, t, src=0, group=None):
        self._check("broadcast", t)

    def all_gather(self, out, t, group=None):
        self._check("all_gather", t, *out)

    def reduce_scatter_tensor(self, out, t, group=None):
        self._check("reduce_scatter_tensor", out, t)

    def broadcast_object_list(self, box, src=0, group=None, device=None):
        if device != torch.device("cuda", 0):
            raise RuntimeError(f"broadcast_object_list: objects staged on {device}, not the group's GPU")
        self.seen.append("broadcast_object_list")


@pytest.fixture
def nccl_world(monkeypatch):
    """A 2-rank NCCL world as the wrappers see it, with :class:`FakeNccl` as the backend and
    CUDA tensors faked (``FakeTensorMode``: shapes and devices, no data, no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeNccl()
    monkeypatch.setattr(pdist, "is_initialized", lambda: True)
    monkeypatch.setattr(pdist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(pdist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(pdist, "backend_of", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter_tensor", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield fake


def test_host_tensors_reach_an_nccl_group_on_its_gpu_and_come_back(nccl_world):
    flag = torch.tensor([1.0, 0.0])
    assert coll.all_reduce(flag, coll.ReduceOp.MAX) is flag and flag.device.type == "cpu"
    assert coll.broadcast(flag, 0) is flag
    rows = coll.all_gather(torch.zeros(3, dtype=torch.int64))
    assert len(rows) == 2 and {r.device.type for r in rows} == {"cpu"}
    coll.barrier()
    gathered = coll.gather_rows(torch.ones(2, 4), [2, 1], differentiable=False)
    assert gathered.shape == (3, 4) and gathered.device.type == "cpu"
    assert coll.broadcast_object({"a": 1}, 0) == {"a": 1}
    assert nccl_world.seen == ["all_reduce", "broadcast", "all_gather", "all_reduce", "all_gather",
                               "broadcast_object_list"]


def test_the_gather_backward_of_host_rows_reduce_scatters_on_the_gpu(nccl_world):
    """``_GatherRows``' two halves called directly (the autograd engine has no fake CUDA, and
    fake CUDA tensors cannot be copied into each other: the caller's rows are on the host)."""
    from types import SimpleNamespace

    ctx = SimpleNamespace()
    out = coll._GatherRows.forward(ctx, torch.ones(2, 4), [2, 1], 0, None)
    grad, *_ = coll._GatherRows.backward(ctx, torch.ones(3, 4))
    assert out.shape == (3, 4) and grad.shape == (2, 4)
    assert out.device.type == grad.device.type == "cpu"
    assert nccl_world.seen == ["all_gather", "reduce_scatter_tensor"]


def test_a_group_reports_its_device(monkeypatch):
    monkeypatch.setattr(pdist, "backend_of", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert coll.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(pdist, "backend_of", lambda group=None: "gloo")
    assert coll.group_device() == torch.device("cpu")


# ----------------------------------------------------------------- real gloo


def _wrappers(rank, world):
    x = torch.tensor([float(rank + 1), -float(rank)])
    coll.all_reduce(x)  # SUM
    m = coll.all_reduce(torch.tensor([rank]), coll.ReduceOp.MAX)
    b = coll.broadcast(torch.full((2,), float(rank)), 1)
    obj = coll.broadcast_object({"from": rank}, 1)
    rows = coll.gather_rows(torch.full((rank + 1, 2), float(rank)), [1, 2, 3][:world], differentiable=False)
    coll.barrier()
    return (x.tolist(), int(m), b.tolist(), obj, rows.tolist(), coll.all_true(rank != 1), coll.all_true(True),
            coll.gather_sizes(torch.tensor([rank, 10 * rank])))


@pytest.mark.multiprocess
def test_the_wrappers_compute_what_a_plain_reference_does():
    out = run_distributed(_wrappers, 3)
    expect = ([6.0, -3.0], 2, [1.0, 1.0], {"from": 1},
              [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0]], False, True,
              [[0, 0], [1, 10], [2, 20]])
    assert out == [expect] * 3


def _leave_at_once(rank, world):
    if rank == 0:
        dist.destroy_process_group()
    return rank


@pytest.mark.multiprocess
def test_a_rank_that_tears_its_group_down_at_once_never_breaks_a_peer_still_connecting():
    """run_distributed connects every rank's group before fn runs anywhere (seen on a loaded
    machine: rank 0's fn destroyed its group while rank 1 was in gloo's connectFullMesh,
    'Connection closed by peer')."""
    for _ in range(3):
        assert run_distributed(_leave_at_once, 4, timeout=120) == [0, 1, 2, 3]


def _train_and_report(rank, world, overrides):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    summary = trainer.train()
    return summary, trainer.head.weight.detach().clone()


@pytest.mark.required
@pytest.mark.multiprocess
def test_a_world_of_one_that_runs_every_collective_trains_like_the_shortcut_path(tmp_path, cache, monkeypatch):
    """3 steps and an evaluation through every collective of the trainer, the head, the
    checkpoint and the verification (what an NCCL world of one runs in the CUDA tier)."""
    common = ("train.deterministic=true", "train.max_steps=3", "eval.at_end=true")
    shortcut = run_distributed(_train_and_report, 1, tiny_overrides(tmp_path / "a", cache, *common))[0]
    monkeypatch.setenv(coll.ALWAYS_COMMUNICATE, "1")
    talking = run_distributed(_train_and_report, 1, tiny_overrides(tmp_path / "b", cache, *common))[0]
    assert talking[0] == shortcut[0] and talking[0]["accuracy"] > 0
    assert torch.equal(talking[1], shortcut[1])


def test_nccl_groups_raise_instead_of_aborting(monkeypatch):
    """init_distributed sets NCCL's error handling to abort the communicator, not the process,
    before it makes an NCCL group (the caller's own settings win), and no blocking wait (a host
    busy-wait in every synchronous collective); the Slurm templates export the same."""
    import argparse

    from partialfc.cli.submit import add_arguments
    from partialfc.launch.submit import render

    assert pdist.NCCL_FAULT_ENV == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    script, _ = render(parser.parse_args([str(ROOT.parent / "configs" / "demo.yaml"), "--gpus-per-node", "2"]))
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=2\n" in script and "BLOCKING_WAIT" not in script
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    made = {}
    monkeypatch.setattr(pdist, "detect_launch_env",
                        lambda: pdist.LaunchEnv(0, 2, 0, 2, "127.0.0.1", 1, "torchrun"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: made.setdefault("device", index))
    monkeypatch.setattr(pdist, "rendezvous", lambda launch, timeout_s: "store")
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: made.update(backend=backend, env={k: os.environ.get(k) for k in
                                                                               ("TORCH_NCCL_BLOCKING_WAIT",
                                                                                "TORCH_NCCL_ASYNC_ERROR_HANDLING")}))
    pdist.init_distributed("nccl")
    assert made == {"device": 0, "backend": "nccl",
                    "env": {"TORCH_NCCL_BLOCKING_WAIT": None, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}}
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    pdist.init_distributed("nccl")
    assert made["env"] == {"TORCH_NCCL_BLOCKING_WAIT": None, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
