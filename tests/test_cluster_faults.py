"""What clusters do to a run, on real processes: a signal to every process of the job (ranks
and their DataLoader workers), a rank that never starts or stops answering, an interrupted run
with dropout and workers, a stop file or checkpoints left by an earlier run, a resume with
another model or objective. (Slurm itself: tests/test_slurm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from partialfc.errors import CheckpointError, ConfigError
from partialfc.testing.multiprocess import run_distributed
from partialfc.testing.ports import listening, reserved_port
from partialfc.train.checkpoint import latest_checkpoint
from partialfc.train.config import load_config
from partialfc.train.logging import read_metrics
from partialfc.train.preemption import EXIT_PREEMPTED, StopRequest
from tests.train_helpers import logged_train_steps, tiny_overrides


@pytest.fixture
def port():
    """The job's MASTER_PORT, reserved while the test runs: rank 0 binds it whenever it gets
    there, and no other process of a busy machine can take it before."""
    with reserved_port() as number:
        yield number


def launch_ranks(run_dir, cache, world, port, *extra, ranks=None):
    """``partialfc train`` as ranks ``ranks`` (default all) of a ``world``-rank gloo job on
    MASTER_PORT ``port``, all in one new process group (as a scheduler's job step); output in
    ``run_dir/rank<r>.log``."""
    os.makedirs(run_dir, exist_ok=True)
    procs = []
    cmd = [sys.executable, "-m", "partialfc.cli", "train", "configs/demo.yaml",
           *tiny_overrides(run_dir, cache, "train.threads=1", *extra)]
    for r in range(world) if ranks is None else ranks:
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("PARTIALFC_STOP_FILE", None)
        group = {"process_group": procs[0].pid if procs else 0}
        log = open(os.path.join(run_dir, f"rank{r}.log"), "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **group))
    return procs


def all_logs(run_dir) -> str:
    return "".join(open(os.path.join(run_dir, f)).read() for f in sorted(os.listdir(run_dir)) if f.endswith(".log"))


def wait_for_steps(run_dir, n, procs, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while len(logged_train_steps(run_dir)) < n:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail(f"training did not reach step {n}:\n{all_logs(run_dir)}")
        time.sleep(0.2)


def wait_until_listening(port, proc, run_dir, timeout=300.0) -> float:
    """When rank 0 (``proc``) started to listen on ``port``: its rendezvous began (start-up,
    imports and the dataset, however long a loaded machine takes for them, are behind it)."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"rank 0 never listened on {port}:\n{all_logs(run_dir)}")
        time.sleep(0.05)
    return time.monotonic()


def read_log(run_dir, rank) -> str:
    return open(os.path.join(run_dir, f"rank{rank}.log")).read()


@pytest.mark.multiprocess
def test_sigterm_to_every_process_with_workers_checkpoints(tmp_path, cache, port):
    """What Slurm does at the time limit, on scancel and on preemption: SIGTERM to the ranks and
    to their DataLoader workers at once. The workers ignore it; the ranks checkpoint, shut their
    workers down and exit 3."""
    run_dir = str(tmp_path / "run")
    procs = launch_ranks(run_dir, cache, 2, port, "data.num_workers=2", "train.max_steps=100000")
    try:
        wait_for_steps(run_dir, 3, procs)
        sent = time.monotonic()
        os.killpg(procs[0].pid, signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
        elapsed = time.monotonic() - sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [read_log(run_dir, r) for r in range(2)]
    assert codes == [EXIT_PREEMPTED] * 2, logs
    assert not any("worker" in log and "killed" in log for log in logs), logs
    stopped = int(logs[0].split("stopped on request at step ")[1].split(";")[0])
    assert stopped >= 3 and latest_checkpoint(os.path.join(run_dir, "checkpoints")).endswith(f"step_{stopped:08d}")
    print(f"SIGTERM to the process group: both ranks exited 3 after {elapsed:.1f} s, checkpoint at step {stopped}")


@pytest.mark.multiprocess
def test_a_rank_that_never_starts_is_named_within_the_timeout(tmp_path, cache, port):
    run_dir = str(tmp_path / "run")
    (rank0,) = launch_ranks(run_dir, cache, 2, port, "dist.timeout_s=5", ranks=[0])
    try:
        start = wait_until_listening(port, rank0, run_dir)
        code = rank0.wait(timeout=120)
    finally:
        if rank0.poll() is None:
            rank0.kill()
    elapsed, log = time.monotonic() - start, read_log(run_dir, 0)
    assert code == 2, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "[1]" in errors[0] and "dist.timeout_s=5" in errors[0], log
    assert "Traceback" not in log
    # from the rendezvous on: the 5 s timeout and the exit, 12x over (load cannot eat that), far
    # below the default dist.timeout_s of 600 s that an ignored setting would leave
    assert elapsed < 60, elapsed
    print(f"rank 1 never started: rank 0 exited 2 {elapsed:.1f} s after its rendezvous began: {errors[0]}")


@pytest.mark.multiprocess
def test_a_rank_that_stops_answering_ends_the_run_with_one_line(tmp_path, cache, port):
    run_dir = str(tmp_path / "run")
    procs = launch_ranks(run_dir, cache, 2, port, "dist.timeout_s=5", "train.max_steps=100000")
    try:
        wait_for_steps(run_dir, 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stalled = time.monotonic()
        code = procs[0].wait(timeout=120)
        elapsed = time.monotonic() - stalled
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = read_log(run_dir, 0)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "dist.timeout_s=5" in errors[0], log
    assert "Traceback" not in log
    assert elapsed < 60, elapsed  # the 5 s timeout and the exit, 12x over; the default would be 600 s
    print(f"rank 1 stopped (SIGSTOP): rank 0 exited 2 after {elapsed:.1f} s: {errors[0]}")


def _train_command(rank, world, overrides):
    """``partialfc train`` in this rank's process; its exit code and whether a process group
    outlives it."""
    import torch.distributed as dist

    from partialfc.cli import main

    return main(["train", "configs/demo.yaml", *overrides]), dist.is_initialized()


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("outcome", ["finished", "config_error"])
def test_the_train_command_leaves_no_process_group_behind(tmp_path, cache, outcome):
    """A group left to the interpreter's exit can abort the process after a finished run
    ('terminate called without an active exception' from gloo's threads, seen on rank 1 of a
    Slurm job that had trained to the end): the command destroys its groups on every exit."""
    extra = {"finished": ["train.max_steps=2"], "config_error": ["train.grad_accum=1000"]}[outcome]
    out = run_distributed(_train_command, 2, tiny_overrides(tmp_path / "run", cache, *extra), timeout=240)
    assert out == [(0 if outcome == "finished" else 2, False)] * 2


def _run(overrides, interrupt_at=None):
    """Train in this process (workers are this process's children); with ``interrupt_at``,
    stop there, checkpoint, drop the trainer and resume in a new one. Returns the losses of
    every step, the head weight and the backbone state."""
    from partialfc.train.trainer import Trainer

    losses = []
    if interrupt_at is not None:
        first = Trainer(load_config(None, overrides))
        losses = [first.train_step()["loss"] for _ in range(interrupt_at)]
        first.save()
        first.close()
        del first
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    losses += [r["loss"] for r in read_metrics(os.path.join(trainer.cfg.run_dir, "metrics.jsonl"))
               if r["kind"] == "train" and r["step"] > len(losses)]
    return losses, trainer.head.weight.detach().clone(), {k: v.clone() for k, v in
                                                            trainer.engine.module.state_dict().items()}


@pytest.mark.multiprocess
def test_resume_is_bitwise_exact_with_dropout_and_workers(tmp_path, cache):
    common = ("model.options={dropout: 0.2}", "data.num_workers=1", "train.deterministic=true",
              "train.max_steps=6", "eval.at_end=false")
    straight = _run(tiny_overrides(tmp_path / "a", cache, *common))
    resumed = _run(tiny_overrides(tmp_path / "b", cache, *common), interrupt_at=3)
    assert len(straight[0]) == 6 and straight[0] == resumed[0]
    assert torch.equal(straight[1], resumed[1])
    for key, value in straight[2].items():
        assert torch.equal(value, resumed[2][key]), key


def test_a_stop_file_left_by_an_earlier_run_is_ignored(tmp_path):
    stop = tmp_path / "stop"
    stop.touch()
    os.utime(stop, (1000, 1000))
    (tmp_path / "stop.done").write_text("7\n")  # the earlier run acknowledged it
    os.utime(tmp_path / "stop.done", (1001, 1001))
    request = StopRequest(str(stop))
    assert not request.local_flag()
    os.utime(stop, (1002, 1002))  # asked again after that run
    assert request.local_flag()
    (tmp_path / "stop.done").unlink()
    os.utime(stop, (1000, 1000))  # never acknowledged: a request for this run
    assert StopRequest(str(stop)).local_flag()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """A run directory holding the checkpoint of a finished 2-step run."""
    from partialfc.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(load_config(None, tiny_overrides(run_dir, cache, "train.max_steps=2", "eval.at_end=false"))).train()
    return run_dir


def test_resume_none_on_a_run_with_checkpoints_refuses(finished_run, cache, tmp_path):
    from partialfc.train.trainer import Trainer

    metrics = (finished_run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="checkpoint.overwrite=true"):
        Trainer(load_config(None, tiny_overrides(finished_run, cache, "checkpoint.resume=none")))
    assert (finished_run / "metrics.jsonl").read_bytes() == metrics
    assert latest_checkpoint(str(finished_run / "checkpoints")).endswith("step_00000002")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    fresh = Trainer(load_config(None, tiny_overrides(copy, cache, "checkpoint.resume=none",
                                                     "checkpoint.overwrite=true")))
    assert fresh.step == 0
    fresh.close()


def test_resume_with_another_model_or_objective_names_the_keys(finished_run, cache):
    from partialfc.train.trainer import Trainer

    changed = ("loss.name=arcface", "loss.params={s: 16.0, m: 0.3}", "head.sample_rate=1.0")
    with pytest.raises(CheckpointError) as err:
        Trainer(load_config(None, tiny_overrides(finished_run, cache, "train.max_steps=4", *changed)))
    message = str(err.value)
    for key in ("loss.name", "loss.params.m", "head.sample_rate", "checkpoint.allow_config_change=true"):
        assert key in message, message
    assert "loss.params.s" not in message and "train.max_steps" not in message
    resumed = Trainer(load_config(None, tiny_overrides(finished_run, cache, "train.max_steps=4", *changed,
                                                       "checkpoint.allow_config_change=true")))
    assert resumed.step == 2
    resumed.close()


def test_the_environment_overrides_the_configured_timeout(monkeypatch):
    from partialfc.dist import TIMEOUT_ENV, resolve_timeout
    from partialfc.errors import LaunchError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert resolve_timeout(600) == 600.0
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert resolve_timeout(600) == 7.5
    for bad in ("soon", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(LaunchError, match=TIMEOUT_ENV):
            resolve_timeout(600)


def test_rendezvous_names_the_missing_ranks(caplog):
    """In-process: rank 0 of 3 alone reports who is missing while it waits, then names them;
    a rank whose rank 0 never comes names the address it tried."""
    from partialfc.dist import LaunchEnv, rendezvous
    from partialfc.errors import DistributedError

    with reserved_port() as port:
        start = time.monotonic()
        with caplog.at_level("WARNING"), pytest.raises(DistributedError, match=r"ranks \[1, 2\] did not join"):
            rendezvous(LaunchEnv(0, 3, 0, 3, "127.0.0.1", port, "torchrun"), timeout_s=1.5, report_every_s=0.5)
        assert time.monotonic() - start < 15  # 10x the 1.5 s timeout: load cannot eat that
    assert any("waiting for ranks [1, 2]" in r.getMessage() for r in caplog.records), caplog.records
    with reserved_port() as port:  # bound and never listening: nobody answers there
        with pytest.raises(DistributedError, match=f"rank 1: no store of rank 0 at 127.0.0.1:{port}"):
            rendezvous(LaunchEnv(1, 2, 1, 2, "127.0.0.1", port, "torchrun"), timeout_s=1.0)


# ---- workers that ignore SIGTERM must never outlive the rank -----------------------------------

SLOW_WORKER_SCRIPT = r"""
import gc, sys, time
import partialfc.data.torch_loader as tl
from partialfc.data.torch_loader import TorchLoader

decode = tl.decode_face
def slow_decode(*args, **kwargs):  # the worker is busy (a slow disk) when the rank shuts it down
    time.sleep(8)
    return decode(*args, **kwargs)
tl.decode_face = slow_decode

loader = TorchLoader(sys.argv[1], 2, rank=0, world_size=1, device="cpu", shuffle=False, num_workers=1)
batches = iter(loader)
next(batches)
print(f"shutting down at {time.monotonic()}", flush=True)  # CLOCK_MONOTONIC: the same clock as the test's
if sys.argv[2] == "close":
    loader.close()
else:  # dropped without close: the DataLoader's own shutdown, as garbage collection runs it
    del batches, loader
    gc.collect()
print("rank done", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["close", "dropped"])
def test_a_busy_worker_never_keeps_the_rank_from_exiting(tmp_path, how):
    """torch's shutdown waits 5 s for a worker, then SIGTERMs it: a worker that ignores SIGTERM
    and is still busy would be left waiting forever, and the rank would hang at exit joining it."""
    from tests.data_helpers import hand_image_payload, jpeg_bytes, smooth_image, write_hand_rec

    write_hand_rec(tmp_path / "d", [(k, hand_image_payload(k % 2, jpeg_bytes(smooth_image(k)), key=k))
                                    for k in range(8)])
    script = tmp_path / "slow_worker.py"
    script.write_text(SLOW_WORKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "d"), how], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:  # start-up and the first batch (two 8 s decodes) on a loaded machine, then the shutdown
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the rank hung at exit on its worker:\n{out}")
    exited = time.monotonic()
    assert proc.returncode == 0, out
    assert "rank done" in out
    # from the shutdown on: torch's 5 s wait for the worker, then the kill; a rank joining its
    # worker hangs for ever. 60 s: 10x what it takes, which load cannot eat
    assert exited - float(out.split("shutting down at ")[1].split()[0]) < 60, out
