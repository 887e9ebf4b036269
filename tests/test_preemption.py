"""Stop requests end in a checkpoint, exit code 3 and an automatic resume (no Slurm here;
``tests/test_slurm.py`` runs the same flow under a real Slurm with a requeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from partialfc.train.checkpoint import latest_checkpoint
from partialfc.train.logging import read_metrics
from partialfc.train.preemption import EXIT_PREEMPTED, StopRequest
from tests.train_helpers import logged_train_steps, tiny_overrides


def train_cli(run_dir, cache, steps, env_extra=None, wait=True):
    cmd = [sys.executable, "-m", "partialfc.cli", "train", "configs/demo.yaml",
           *tiny_overrides(run_dir, cache, f"train.max_steps={steps}", "train.threads=1")]
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def test_stop_request_sources(tmp_path):
    stop_file = tmp_path / "stop"
    request = StopRequest(str(stop_file))
    assert not request.local_flag()
    stop_file.touch()
    assert request.local_flag()
    request = StopRequest(None).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.local_flag()
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.multiprocess
def test_stop_file_checkpoints_exits_3_and_resume_finishes(tmp_path, cache):
    run_dir = tmp_path / "run"
    stop_file = tmp_path / "stop"
    stop_file.touch()  # already requested: the first step boundary stops
    code, out = train_cli(run_dir, cache, 6, {"PARTIALFC_STOP_FILE": str(stop_file)})
    assert code == EXIT_PREEMPTED, out
    assert "stopped on request at step 1" in out
    assert latest_checkpoint(str(run_dir / "checkpoints")).endswith("step_00000001")
    assert (tmp_path / "stop.done").read_text() == "1\n"  # the marker the batch script requeues on
    # the stop file is left in place: acknowledged by the run above, it does not stop this launch
    code, out = train_cli(run_dir, cache, 6, {"PARTIALFC_STOP_FILE": str(stop_file)})
    assert code == 0, out
    assert "at step 1" in out and "resumed from" in out
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(str(run_dir / "checkpoints")).endswith("step_00000006")


@pytest.mark.multiprocess
def test_sigterm_mid_training_checkpoints_and_exits_3(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, cache, 100_000, wait=False)
    deadline = time.monotonic() + 300  # start-up on a loaded machine; the signal goes once training is under way
    while len(logged_train_steps(run_dir)) < 3:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"training did not reach step 3:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped = int(out.split("stopped on request at step ")[1].split(";")[0])
    assert stopped >= 3
    assert latest_checkpoint(str(run_dir / "checkpoints")).endswith(f"step_{stopped:08d}")
