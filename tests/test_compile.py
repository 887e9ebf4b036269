"""``train.compile``: the backbone under ``torch.compile`` (inductor, the real compiler) trains
on 2 DDP ranks with gradient accumulation (``no_sync`` micro-steps), compiles once (an epoch's
end does not recompile: training batches are all full), and its checkpoints do not depend on
the option: no ``_orig_mod.`` keys, a compiled run resumes uncompiled and the reverse."""

from __future__ import annotations

import os

import pytest
import torch

from partialfc.testing.multiprocess import run_distributed
from partialfc.train.checkpoint import latest_checkpoint, load_shared
from tests.train_helpers import tiny_overrides


def _runs(rank: int, world: int, run_dir: str, cache: str) -> list[dict]:
    from torch._dynamo.utils import counters

    from partialfc.train.config import load_config
    from partialfc.train.trainer import Trainer

    out = []
    for compiled, steps in ((True, 6), (False, 8), (True, 10)):  # 2 steps per epoch: each run crosses one
        trainer = Trainer(load_config(None, tiny_overrides(
            run_dir, cache, f"train.compile={str(compiled).lower()}", f"train.max_steps={steps}", "data.batch_size=32",
            "train.grad_accum=2", "checkpoint.every_steps=2", "eval.at_end=false")))
        start, graphs = trainer.step, []
        train_step = trainer.train_step

        def step():
            result = train_step()
            graphs.append(counters["stats"]["unique_graphs"])
            return result

        trainer.train_step = step
        summary = trainer.train()
        out.append({"start": start, "end": summary["step"], "loss": summary["loss"], "graphs": graphs,
                    "keys": list(trainer.engine.module.state_dict())})
    return out


@pytest.mark.multiprocess
def test_a_compiled_backbone_trains_without_recompiling_and_resumes_either_way(tmp_path, cache):
    from partialfc.models import build_backbone

    first, eager, again = run_distributed(_runs, 2, str(tmp_path), str(cache), timeout=900)[0]
    assert [(r["start"], r["end"]) for r in (first, eager, again)] == [(0, 6), (6, 8), (8, 10)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in (first, eager, again))
    assert first["graphs"][0] >= 1 and len(set(first["graphs"])) == 1, first["graphs"]  # once, across the epoch
    assert len(set(eager["graphs"])) == 1  # nothing compiled while eager
    assert len(set(again["graphs"])) == 1, again["graphs"]
    saved = load_shared(latest_checkpoint(os.path.join(tmp_path, "checkpoints")))["state"]["engine"]["module"]
    assert not any("_orig_mod" in k for k in saved) and list(saved) == first["keys"]
    plain = build_backbone("iresnet_tiny", 32)
    plain.load_state_dict(saved)  # strict: an export loads into the plain model
