"""Slurm integration on a real single-node cluster started by the fixture."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from partialfc.testing.ports import reserved_port
from partialfc.testing.slurm import SlurmCluster, slurm_available
from tests.train_helpers import logged_train_steps

pytestmark = [pytest.mark.required, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "partialfc.cli", "submit", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("pattern", ["task-per-gpu", "torchrun"])
def test_dry_run_is_a_valid_sbatch_script(cluster, tmp_path, pattern):
    config = tmp_path / "demo.yaml"
    config.write_text("seed: 1\ndata:\n  synthetic: {}\n")  # valid: submit loads it
    done = submit(str(config), "train.max_steps=5", "--pattern", pattern, "--tasks-per-node", "2", "--cpus-per-task",
                  "1", "--time", "00:10:00", "--overcommit", "--run-dir", str(tmp_path / "run"), "--dry-run",
                  env=cluster.env)
    assert done.returncode == 0, done.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(done.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, env=cluster.env)
    assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert "--signal=B:USR1@120" in done.stdout and "--requeue" in done.stdout
    assert "train.max_steps=5" in done.stdout and f"run_dir={tmp_path / 'run'}" in done.stdout


def test_submit_rejects_inconsistent_options(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\ndata:\n  synthetic: {}\n")  # valid: submit loads it
    for args, message in [((), "no ranks per node"), (("--gpus-per-node", "2", "--tasks-per-node", "4"), "exceeds"),
                          (("--tasks-per-node", "1", "--time", "soon"), "not [D-]HH:MM:SS")]:
        done = submit(str(config), *args, "--dry-run")
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "not found" in submit(str(tmp_path / "missing.yaml"), "--tasks-per-node", "1", "--dry-run").stderr
    spaced = submit(str(config), "--tasks-per-node", "1", "--run-dir", str(tmp_path / "my run"), "--dry-run")
    assert spaced.returncode == 2 and "white space" in spaced.stderr
    named = submit(str(config), "--tasks-per-node", "1", "--job-name", "my job", "--dry-run")
    assert "#SBATCH --job-name=my-job" in named.stdout


def tiny_training(tmp_path, steps: int) -> list[str]:
    """Overrides that make the demo a seconds-long run (cached data under tmp_path)."""
    return [f"data.cache_dir={tmp_path / 'data'}", "data.synthetic.num_identities=16",
            "data.synthetic.images_per_identity=8", "data.synthetic.verification_identities=8",
            "data.synthetic.verification_pairs=40", "data.batch_size=8", "data.num_workers=0",
            f"train.max_steps={steps}", "train.threads=1", "eval.every_steps=0", "eval.at_start=false",
            "log.every_steps=1", "log.wandb.mode=disabled", "log.plot=false", "checkpoint.every_steps=0"]


SUBMITTED_ENGINES = {"ddp": ["train.engine=ddp"], "zero0": ["train.engine=deepspeed", "train.deepspeed.zero_stage=0"],
                     "zero1": ["train.engine=deepspeed", "train.deepspeed.zero_stage=1", "train.precision=bf16"],
                     "zero2": ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"]}


@pytest.mark.parametrize("pattern, engine", [("task-per-gpu", "ddp"), ("task-per-gpu", "zero1"),
                                             ("torchrun", "zero0"), ("torchrun", "zero2")])
def test_submit_demo_training_with_two_ranks(cluster, tmp_path, pattern, engine):
    """``partialfc submit`` rendered and run, each engine once across its two patterns (the
    launch matrix's submit row: docs/scaling.md)."""
    if engine != "ddp":
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    done = submit("configs/demo.yaml", *tiny_training(tmp_path, 4), *SUBMITTED_ENGINES[engine],
                  "--pattern", pattern, "--tasks-per-node", "2",
                  "--cpus-per-task", "1", "--overcommit", "--time", "00:10:00", "--run-dir", str(run_dir),
                  env=cluster.env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[2].rstrip(":"))
    info = cluster.wait(job_id, timeout=400)
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    shared = __import__("torch").load(run_dir / "checkpoints" / latest / "trainer.pt", weights_only=True)
    assert shared["meta"]["world_size"] == 2 and shared["state"]["progress"]["step"] == 4  # ranks, world from Slurm
    assert sorted(p.name for p in (run_dir / "checkpoints" / latest).glob("head_rank*.pt")) == [
        "head_rank00000.pt", "head_rank00001.pt"]
    assert logged_train_steps(run_dir) == [1, 2, 3, 4]


def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    run_dir = tmp_path / "run"
    steps = 400
    done = submit("configs/demo.yaml", *tiny_training(tmp_path, steps), "--tasks-per-node", "2", "--cpus-per-task",
                  "1", "--overcommit", "--time", "00:15:00", "--run-dir", str(run_dir), env=cluster.env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[2].rstrip(":"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until training is under way
        if len(logged_train_steps(run_dir)) >= 5:
            break
        time.sleep(0.5)
    else:
        pytest.fail("training did not start: " + "".join(p.read_text() for p in run_dir.glob("slurm-*.out")))
    # what --signal=B:USR1@T does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True, env=cluster.env)
    info = cluster.wait(job_id, timeout=600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info.get("Restarts", 0)) == 1, info
    assert re.search(r"checkpoint written at step \d+; requeueing", log)
    stopped = [int(s) for s in re.findall(r"stopped on request at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert stopped and resumed == stopped[:1] and 0 < stopped[0] < steps, log
    assert logged_train_steps(run_dir) == list(range(1, steps + 1))  # each step once, across the requeue


def test_scancel_term_with_workers_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """`scancel --signal=TERM`: SIGTERM to every process of the job step, DataLoader workers
    included (here 2 per rank), as a preemption with grace time does."""
    run_dir = tmp_path / "run"
    steps = 400
    done = submit("configs/demo.yaml", *tiny_training(tmp_path, steps), "data.num_workers=2", "--tasks-per-node",
                  "2", "--cpus-per-task", "1", "--overcommit", "--time", "00:15:00", "--run-dir", str(run_dir),
                  env=cluster.env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[2].rstrip(":"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(logged_train_steps(run_dir)) >= 5:
            break
        time.sleep(0.5)
    else:
        pytest.fail("training did not start: " + "".join(p.read_text() for p in run_dir.glob("slurm-*.out")))
    sent = time.monotonic()
    subprocess.run(["scancel", "--signal=TERM", str(job_id)], check=True, env=cluster.env)
    cluster.wait(job_id, timeout=120, states=("PENDING", "COMPLETED", "FAILED", "CANCELLED"),
                 until=lambda job: int(job.get("Restarts", 0)) >= 1)  # requeued, however briefly PENDING
    requeued_after = time.monotonic() - sent
    info = cluster.wait(job_id, timeout=600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info.get("Restarts", 0)) == 1, info
    assert "killed by signal" not in log, log
    stopped = [int(s) for s in re.findall(r"stopped on request at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert stopped and resumed == stopped[:1] and 0 < stopped[0] < steps, log
    assert logged_train_steps(run_dir) == list(range(1, steps + 1))  # each step once, across the requeue
    print(f"scancel --signal=TERM with 2 workers per rank: checkpoint at step {stopped[0]}, job pending "
          f"for its requeue {requeued_after:.1f} s after the signal, resumed at step {resumed[0]}, finished")


def test_concurrent_test_clusters_number_their_jobs_apart(tmp_path, monkeypatch):
    """Two test sessions on one machine: their clusters' job ids (hence the templates'
    MASTER_PORT = 15000 + id % 20000) come from different blocks; a dead owner's block is
    taken over, and stop() gives it back."""
    import subprocess as sp

    from partialfc.testing import slurm

    monkeypatch.setattr(slurm, "CLAIMS", tmp_path / "claims")
    assert [slurm._claim_job_block(), slurm._claim_job_block()] == [0, 1]
    dead = sp.Popen(["true"])
    dead.wait()
    (tmp_path / "claims" / "0").write_text(str(dead.pid))  # whoever held block 0 is gone
    assert slurm._claim_job_block() == 2 and not (tmp_path / "claims" / "0").exists()
    assert slurm._claim_job_block() == 0
    assert "FirstJobId=3001\n" in slurm._conf(tmp_path, "h", 2, 6817, 1 + 3 * slurm.JOB_IDS_PER_CLUSTER)


# ----------------------------------------------------------------- the launch matrix's Slurm rows
MATRIX_CELLS = {  # each engine once per launcher (tests/test_launch_matrix.py has the gloo-only rows)
    "srun": ["ddp:bf16", "zero0:fp32", "zero1:bf16", "zero2:fp32"],
    "srun+torchrun": ["ddp:fp32", "zero0:bf16", "zero1:fp32", "zero2:bf16"],
}


@pytest.mark.parametrize("launcher", sorted(MATRIX_CELLS))
def test_launch_matrix_under_srun(cluster, tmp_path, cache, matrix_reference, launcher):
    """``srun`` one task per rank (Slurm's variables only), and ``srun`` of one torchrun per
    node: each engine's cell (tests/matrix_cell.py), checked against the uninterrupted run."""
    pytest.importorskip("deepspeed")
    from tests.matrix_cell import check_cell
    from tests.test_launch_matrix import read_cells

    cells = MATRIX_CELLS[launcher]
    srun = ["srun", "--nodes=1", "--overcommit", "--cpus-per-task=1", "--time=00:10:00", "--kill-on-bad-exit=1"]
    env = {k: v for k, v in cluster.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    with reserved_port() as port:
        if launcher == "srun":  # the ranks meet at MASTER_ADDR:MASTER_PORT, as the template exports them
            command = [*srun, "--ntasks=2", sys.executable, "-m", "tests.matrix_cell"]
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            command = [*srun, "--ntasks=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                       "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "-m",
                       "tests.matrix_cell"]
        done = subprocess.run([*command, str(tmp_path), cache, *cells], capture_output=True, text=True,
                              env={**env, "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    reference = matrix_reference(*cells)
    for cell, records in read_cells(tmp_path, cells).items():
        check_cell(records, reference[cell], "slurm" if launcher == "srun" else "torchrun")
