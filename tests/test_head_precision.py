"""The head's compute dtype follows the run's precision whatever the engine (issue 25 item 4):
under DeepSpeed bf16 there is no autocast (the engine casts the backbone) and the head used to
upcast the bf16 embeddings to its fp32 centres, so every matmul of the head ran in fp32
(``ieee`` dots in the Triton kernel). Counted here by the dtypes of the matmuls dispatched."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from partialfc.head import PartialFC
from partialfc.losses import CosFace
from partialfc.testing.multiprocess import run_distributed
from partialfc.train.config import load_config
from tests.train_helpers import tiny_overrides

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul's first input."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.dtypes.append(next(a for a in args if torch.is_tensor(a) and a.dim() == 2).dtype)
        return func(*args, **(kwargs or {}))


def _head(fused: str, compute_dtype=None) -> PartialFC:
    return PartialFC(16, 40, loss=CosFace(s=16.0, m=0.2), sample_rate=0.5, seed=3, fused=fused,
                     compute_dtype=compute_dtype)


@pytest.mark.parametrize("fused", ["torch", "plain"])
def test_the_head_autocasts_itself_to_its_compute_dtype(fused):
    """bf16 embeddings (a DeepSpeed bf16 backbone's) and no autocast: with compute_dtype bf16
    the loss and gradients equal the same head's under the caller's bf16 autocast, bit for bit,
    and every matmul is bf16; without it (the old behaviour) every matmul is fp32."""
    emb = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    labels = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1))
    runs = {}
    for name, compute, ambient in (("self", torch.bfloat16, False), ("caller", None, True), ("none", None, False)):
        head, e = _head(fused, compute), emb.clone().requires_grad_(True)
        with MatmulDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=ambient):
            loss = head(e, labels)
            loss.backward()
        runs[name] = (loss.detach(), e.grad, head.weight.grad.to_dense(), seen.dtypes)
    assert set(runs["self"][3]) == {torch.bfloat16} and set(runs["none"][3]) == {torch.float32}
    for a, b in zip(runs["self"][:3], runs["caller"][:3]):
        assert torch.equal(a, b)
    assert runs["self"][0].dtype == torch.float32  # the reductions stay fp32
    torch.testing.assert_close(runs["self"][0], runs["none"][0], rtol=2e-2, atol=2e-2)


def test_compute_dtype_is_a_half_precision_or_none():
    with pytest.raises(ValueError, match="compute_dtype must be None"):
        _head("torch", torch.float64)


def _head_matmuls(rank: int, world: int, run_dir: str, cache: str, engine: str, precision: str) -> list:
    """The dtypes of the matmuls of the head's forward and backward in one training step."""
    from partialfc.train.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, cache, f"train.engine={engine}",
                                                       f"train.precision={precision}", "train.max_steps=1")))
    forward, seen = trainer.head.forward, []

    def recorded(*args, **kwargs):
        mode = MatmulDtypes()
        with mode:
            loss = forward(*args, **kwargs)
        seen.append(mode)
        return loss

    trainer.head.forward = recorded
    trainer.train_step()
    trainer.close()
    return [str(d) for d in seen[0].dtypes]


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_the_heads_matmuls_follow_train_precision_with_each_engine(tmp_path, cache, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    for precision, dtype in (("bf16", "torch.bfloat16"), ("fp32", "torch.float32")):
        dtypes = run_distributed(_head_matmuls, 1, str(tmp_path / precision), str(cache), engine, precision,
                                 timeout=300)[0]
        assert dtypes and set(dtypes) == {dtype}, (engine, precision, dtypes)
