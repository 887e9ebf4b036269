"""Slurm integration on a real single-node cluster started by the fixture."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partialfc.testing.slurm import SlurmCluster, slurm_available

pytestmark = [pytest.mark.required]


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
    config.write_text("seed: 1\n")
    done = submit(str(config), "train.steps=5", "--pattern", pattern, "--tasks-per-node", "2", "--cpus-per-task",
                  "1", "--time", "00:10:00", "--overcommit", "--run-dir", str(tmp_path / "run"), "--dry-run",
                  env=cluster.env)
    assert done.returncode == 0, done.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(done.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, env=cluster.env)
    assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert "--signal=B:USR1@120" in done.stdout and "--requeue" in done.stdout
    assert "train.steps=5" in done.stdout and f"run_dir={tmp_path / 'run'}" in done.stdout


def test_submit_rejects_inconsistent_options(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    for args, message in [((), "no ranks per node"), (("--gpus-per-node", "2", "--tasks-per-node", "4"), "exceeds"),
                          (("--tasks-per-node", "1", "--time", "soon"), "not [D-]HH:MM:SS")]:
        done = submit(str(config), *args, "--dry-run")
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "not found" in submit(str(tmp_path / "missing.yaml"), "--tasks-per-node", "1", "--dry-run").stderr
