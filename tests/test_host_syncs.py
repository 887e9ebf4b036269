"""A training step's host synchronisations and collectives, counted on CPU and asserted exactly
(docs/head.md, "What a step waits for"). On a GPU each synchronisation stalls the host until
the device has caught up; none can be seen by timing on a CPU, so they are counted by
:class:`~partialfc.testing.host_syncs.HostSyncCounter` around ``Trainer.train_step``, for each
engine, precision, sample rate and world size, on a step that logs nothing (the log only
formats host values the step already read). Before this count the step made 15-24 of them.

The steady-state budget per optimizer step, each one named:

- 1: the step's shared decision (finite or skip, the requests, the head's input check of
  every rank, the values for the record), read in one copy. At sample rate 0.1 the tiny
  config's padded batch holds more positives than the sample: the sample is padded to a
  static size, with no ``unique`` (there were 2 more before);
- DeepSpeed ZeRO-1/2: DeepSpeed's own 2 in its step (its skip of a non-finite norm, and fp32's
  second check or bf16's clipping factor, decided on the host); the trainer learns the skip
  from DeepSpeed's host decision and leaves the norm on the device until it is logged.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest

from partialfc.testing.multiprocess import run_distributed
from tests.train_helpers import tiny_overrides

pytestmark = [pytest.mark.required, pytest.mark.multiprocess]

COMBOS = [(engine, precision, rate, 1) for engine in ("ddp", "deepspeed") for precision in ("fp32", "bf16")
          for rate in (1.0, 0.1)] + [("ddp", "bf16", 0.1, 2)]  # (engine, precision, rate, micro-batches a step)


def _site(where: str) -> str:
    """``file:line function`` without the line number (the budget names sites, not lines)."""
    return re.sub(r":\d+ ", " ", where)


def _count(rank: int, world: int, run_root: str, cache: str) -> dict:
    from partialfc.testing.host_syncs import HostSyncCounter
    from partialfc.train.config import load_config
    from partialfc.train.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = {}
    for engine, precision, rate, accum in COMBOS:
        run_dir = os.path.join(run_root, f"{engine}-{precision}-{rate}-{accum}")
        trainer = Trainer(load_config(None, tiny_overrides(
            run_dir, cache, f"train.engine={engine}", f"train.precision={precision}", f"head.sample_rate={rate}",
            f"train.grad_accum={accum}", "train.max_steps=20", "log.every_steps=1000")))
        step, marks = trainer.head_optimizer.step, []

        def recorded(*args, **kwargs):  # outside the counter, whose references change autograd's path
            grad = trainer.head.weight.grad
            marks.append(not grad.is_sparse or grad.is_coalesced())
            return step(*args, **kwargs)

        trainer.head_optimizer.step = recorded
        for _ in range(2):  # past the first step's lazy set-up
            trainer.train_step()
        with HostSyncCounter() as counted:
            trainer.train_step()
        trainer.close()
        out[engine, precision, rate, accum] = (
            Counter({(what, _site(where)): n for (what, where), n in counted.sync_sites.items()}),
            Counter({(what, _site(where)): n for (what, where), n in counted.collective_sites.items()}), marks)
    return out


def budget(engine: str, precision: str, rate: float, accum: int, world: int) -> tuple[Counter, Counter]:
    """The host synchronisations and collectives a step of ``accum`` micro-batches may make
    (the module docstring's list)."""
    syncs = Counter({("Tensor.tolist", "train/trainer.py train_step"): 1})
    collectives = Counter()
    if world > 1:  # the head's, through ops/collectives.py (DDP's bucket all-reduce is C++, not counted)
        collectives.update({("all_gather", "ops/collectives.py all_gather"): 2 * accum,
                            ("all_reduce", "ops/collectives.py _in_place"): 3 * accum + 1})  # + the agreement
    if engine == "deepspeed":  # ZeRO-1
        syncs.update({("_local_scalar_dense", "deepspeed < train/engine.py step"): 2})
        collectives[("all_reduce", "deepspeed < train/engine.py backward")] = 1
        if precision == "fp32":  # its ZeRO optimizer's norm (bf16 ZeRO-1 is its BF16_Optimizer)
            collectives[("all_reduce", "deepspeed < train/engine.py step")] = 1
    return syncs, collectives


@pytest.mark.parametrize("world", [1, 2])
def test_a_training_step_makes_only_the_host_syncs_and_collectives_of_its_budget(tmp_path, cache, world):
    pytest.importorskip("deepspeed")
    counted = run_distributed(_count, world, str(tmp_path), str(cache), timeout=600)
    for rank, per_combo in enumerate(counted):
        for (engine, precision, rate, accum), (syncs, collectives, marks) in per_combo.items():
            expected = budget(engine, precision, rate, accum, world)
            assert (syncs, collectives) == expected, (rank, engine, precision, rate, accum, syncs, collectives)
            assert marks == [True] * 3, (engine, precision, rate, accum)  # the head's gradient reached its optimizer
            # coalesced on every step, counted or not (no coalesce, no sortedness check there)
    for key in [("ddp", "fp32", 1.0, 1), ("ddp", "fp32", 0.1, 1), ("ddp", "bf16", 0.1, 2)]:
        assert sum(counted[0][key][0].values()) == 1
