"""The training state by scope (shared, local, rows), the head optimizer's row state, and
resuming a checkpoint of the previous format (2)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from partialfc.head.optim import SparseRowAdamW, SparseRowSGD
from partialfc.testing.multiprocess import run_distributed
from partialfc.train.config import load_config
from tests.train_helpers import tiny_overrides

FORMAT2 = Path(__file__).parent / "data" / "checkpoint_format2"
FORMAT2_RUN = ("data.synthetic.verification_pairs=0", "data.synthetic.num_identities=16", "model.embedding_size=16")


def _sparse_step(optimizer, param, rows, seed):
    grad = torch.randn(len(rows), param.shape[1], generator=torch.Generator().manual_seed(seed))
    param.grad = torch.sparse_coo_tensor(torch.tensor([rows]), grad.to(param.dtype), param.shape)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("klass", [SparseRowSGD, SparseRowAdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_state_and_the_rest_restore_the_optimizer_exactly(klass, dtype):
    """state_dict() holds no per-row tensor, row_state() all of them; together they continue
    bitwise as the optimizer they came from (bf16: its rounding counter included)."""
    kwargs = {"lr": 0.1, "momentum": 0.9} if klass is SparseRowSGD else {"lr": 0.01}
    param = torch.nn.Parameter(torch.randn(6, 4).to(dtype))
    original = klass([param], **kwargs, seed=3)
    for step, rows in enumerate(([0, 2], [1, 2, 5])):
        _sparse_step(original, param, rows, step)
    rest, rows = original.state_dict(), original.row_state()
    assert set(rows) == set(klass.row_keys) and all(v.shape[0] == 6 for v in rows.values())
    assert not any(k in s for s in rest["state"].values() for k in klass.row_keys)
    if dtype == torch.bfloat16:
        assert rest["state"][0]["rounding_step"] == 2
    copy = torch.nn.Parameter(param.detach().clone())
    restored = klass([copy], **{**kwargs, "lr": 0.5}, seed=3)  # the param groups come from state_dict
    restored.load_row_state(rows)
    restored.load_state_dict(rest)
    assert restored.param_groups[0]["lr"] == 0.1 or klass is SparseRowAdamW
    for optimizer, p in ((original, param), (restored, copy)):
        _sparse_step(optimizer, p, [2, 3], 9)
    assert torch.equal(param, copy)
    for name in klass.row_keys:
        assert torch.equal(original.row_state()[name], restored.row_state()[name]), name


def _resume_format2(rank, world, path, run_dir, cache):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, tiny_overrides(run_dir, cache, "train.max_steps=4",
                                                       f"checkpoint.resume={path}", *FORMAT2_RUN)))
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    trainer.close()
    return losses


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 1])
def test_a_format2_checkpoint_resumes_as_the_code_that_wrote_it(tmp_path, world):
    """A checkpoint written by the format-2 code (commit 251281e, two ranks) resumes on the
    same world size and resharded onto one rank; the next two steps' losses are the ones that
    code computed after the same resume (tests/data/checkpoint_format2/expected.json)."""
    from partialfc.train.data import prepare_dataset

    expected = json.loads((FORMAT2 / "expected.json").read_text())["losses_after_resume"][str(world)]
    path = tmp_path / "step_00000002"
    shutil.copytree(FORMAT2, path)
    cache = str(tmp_path / "cache")
    prepare_dataset(load_config(None, tiny_overrides(tmp_path / "prep", cache, *FORMAT2_RUN)).data, [])
    results = run_distributed(_resume_format2, world, str(path), str(tmp_path / "run"), cache)
    assert results[0] == pytest.approx(expected, rel=1e-5) and results[0] != pytest.approx(expected[::-1])
    assert all(r == results[0] for r in results)
