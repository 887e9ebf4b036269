"""The launcher x engine x precision matrix on gloo, the launchers that need no Slurm:
torchrun and DeepSpeed's launcher, each with DDP and DeepSpeed ZeRO-0/1/2, each engine in
fp32 under one and bf16 under the other (docs/scaling.md, "The launch matrix"). Every cell
(tests/matrix_cell.py) is 2 ranks, a stop and checkpoint after step 2, a resume that must
continue with the uninterrupted run's losses and norms, and a non-finite step that every rank
skips. The Slurm launchers' cells are in tests/test_slurm.py (its cluster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from partialfc.testing.ports import reserved_port
from tests.matrix_cell import check_cell

pytestmark = [pytest.mark.required, pytest.mark.multiprocess]

CELLS = {  # each engine once per launcher; each engine's precisions split between the two
    "torchrun": ["ddp:fp32", "zero0:bf16", "zero1:fp32", "zero2:bf16"],
    "deepspeed": ["ddp:bf16", "zero0:fp32", "zero1:bf16", "zero2:fp32"],
}


def read_cells(out: Path, cells: list[str]) -> dict[str, list[dict]]:
    """Each cell's rank records, written by tests/matrix_cell.py."""
    return {c: [json.loads((out / c.replace(":", "-") / f"rank{r}.json").read_text()) for r in range(2)]
            for c in cells}


def launch_command(launcher: str, port: int) -> list[str]:
    """The launcher's command line up to the module it runs."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                "-m"]
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    if deepspeed is None:
        pytest.skip("the deepspeed launcher is not installed (pip install -e .[deepspeed])")
    return [deepspeed, "--num_accelerators", "2", "--master_port", str(port), "--no_local_rank", "--module"]


@pytest.mark.parametrize("launcher", sorted(CELLS))
def test_each_engine_under_the_launcher(tmp_path, cache, matrix_reference, launcher):
    pytest.importorskip("deepspeed")
    cells = CELLS[launcher]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    with reserved_port() as port:
        done = subprocess.run([*launch_command(launcher, port), "tests.matrix_cell", str(tmp_path), cache,
                               *cells], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    reference = matrix_reference(*cells)
    for cell, records in read_cells(tmp_path, cells).items():
        check_cell(records, reference[cell], launcher)
