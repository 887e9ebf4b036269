"""One rank of the launcher x engine x precision matrix (docs/scaling.md, tests/test_launch_matrix.py).

``python -m tests.matrix_cell OUT CACHE CELL...`` under any launcher (torchrun, the deepspeed
launcher, srun, srun + torchrun): for each ``CELL`` (``ENGINE:PRECISION``, ENGINE one of
``ddp``, ``zero0``, ``zero1``, ``zero2``), in ``OUT/CELL``:

1. the tiny run of 4 optimizer steps is stopped on request after step 2 (rank 0's SIGTERM
   flag, as a preemption): every rank checkpoints and raises ``Preempted``;
2. the same config resumes from that checkpoint and finishes; at step 3 rank 1's loss is
   NaN, a step every rank must skip.

Writes ``OUT/CELL/rank<r>.json``: the launch environment, each step's loss, gradient norms
(NaN as null) and whether it applied, the step the second part resumed at and the skipped
steps. :func:`run_cell` with
``stop_at=None`` is the uninterrupted reference (one part).
"""

from __future__ import annotations

import json
import math
import os
import sys

STEPS, STOP_AT, NAN_AT = 4, 2, 3  # optimizer steps; the stop after step 2; rank 1's NaN loss in step 3


def cell_overrides(run_dir: str, cache: str, cell: str) -> list[str]:
    """The tiny run (tests/train_helpers.py) on one thread, as ``cell`` names engine and precision."""
    from tests.train_helpers import tiny_overrides

    engine, precision = cell.split(":")
    stage = ["train.engine=ddp"] if engine == "ddp" else ["train.engine=deepspeed",
                                                           f"train.deepspeed.zero_stage={engine[-1]}"]
    return tiny_overrides(run_dir, cache, *stage, f"train.precision={precision}", f"train.max_steps={STEPS}",
                          "train.threads=1", "eval.at_end=false", "eval.at_start=false")


def _part(overrides: list[str], stop_at: int | None, steps: list[dict]) -> tuple[int, int, bool]:
    """Train to the end or to the stop; appends each step's ``{"step", "loss", "finite"}`` to
    ``steps``; returns (the step it started at, skipped steps, stopped on request)."""
    from partialfc import dist as pdist
    from partialfc.train.config import load_config
    from partialfc.train.preemption import Preempted
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    start, forward, train_step = trainer.step, trainer.head.forward, trainer.train_step
    rank = pdist.get_rank()

    def head(*args, **kwargs):
        loss = forward(*args, **kwargs)
        if stop_at is not None and trainer.step + 1 == stop_at and rank == 0:
            trainer.requests.signalled = True  # what SIGTERM's handler does
        return loss * float("nan") if trainer.step + 1 == NAN_AT and rank == 1 else loss

    def step():
        out = train_step()
        steps.append({"step": trainer.step, "finite": out["finite"],
                      **{k: float(out[k]) for k in ("loss", "grad_norm_backbone", "grad_norm_head")}})
        return out

    trainer.head.forward, trainer.train_step = head, step
    try:
        trainer.train()
    except Preempted:
        return start, trainer.skipped_steps, True
    return start, trainer.skipped_steps, False


def run_cell(out_dir: str, cache: str, cell: str, stop_at: int | None = STOP_AT) -> dict:
    """This rank's record of ``cell`` (written to ``out_dir/cell/rank<r>.json``)."""
    from partialfc import dist as pdist

    launch = pdist.detect_launch_env()
    run_dir = os.path.join(out_dir, cell.replace(":", "-"))
    overrides = cell_overrides(run_dir, cache, cell)
    steps: list[dict] = []
    first = _part(overrides, stop_at, steps)
    parts = [first] if not first[2] else [first, _part(overrides, None, steps)]
    record = {"cell": cell, "launcher": launch.launcher, "rank": pdist.get_rank(),
              "world_size": pdist.get_world_size(), "local_rank": launch.local_rank,
              "steps": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in s.items()} for s in steps],
              "stopped": [p[2] for p in parts], "resumed_at": [p[0] for p in parts][1:],
              "skipped_steps": parts[-1][1]}
    with open(os.path.join(run_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


def reference_cells(rank: int, world: int, out_dir: str, cache: str, cells: list[str]) -> dict:
    """For :func:`partialfc.testing.multiprocess.run_distributed`: ``cells`` run uninterrupted."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return {cell: run_cell(out_dir, cache, cell, stop_at=None) for cell in cells}


def check_cell(records: list[dict], reference: list[dict], launcher: str) -> None:
    """``records`` (rank 0, rank 1) of a stopped and resumed cell against the uninterrupted
    ``reference``: the launcher's layout, the stop and resume at step 2, step 3 skipped by
    every rank, every step's loss and agreed gradient norms equal to the reference's."""
    cell = records[0]["cell"]
    assert [(r["rank"], r["local_rank"], r["world_size"], r["launcher"]) for r in records] == [
        (0, 0, 2, launcher), (1, 1, 2, launcher)], (cell, records)
    for rank, (got, want) in enumerate(zip(records, reference)):
        assert got["stopped"] == [True, False] and got["resumed_at"] == [STOP_AT], (cell, rank, got)
        assert [s["finite"] for s in got["steps"]] == [s != NAN_AT for s in range(1, STEPS + 1)], (cell, rank)
        assert got["skipped_steps"] == 1, (cell, rank)
        assert got["steps"] == want["steps"], (cell, rank, got["steps"], want["steps"])
    norms = [[(s["grad_norm_backbone"], s["grad_norm_head"]) for s in r["steps"]] for r in records]
    assert norms[0] == norms[1], (cell, norms)  # one agreed norm, NaN (null) on the skipped step
    assert norms[0][NAN_AT - 1] == (None, None), (cell, norms)


def main(argv: list[str]) -> None:
    out_dir, cache, *cells = argv
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for cell in cells:
        run_cell(out_dir, cache, cell)


if __name__ == "__main__":
    from partialfc import dist as pdist
    from partialfc.cli import exit_process

    main(sys.argv[1:])
    pdist.shutdown_distributed()
    exit_process(0)  # as partialfc's own process ends: a finished rank cannot abort in the teardown
