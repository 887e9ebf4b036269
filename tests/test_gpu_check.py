"""launch/gpu_check.sh's CPU dry path (GPU_CHECK_DRY=1): every step runs at tiny sizes, the
results land in GPU_CHECK_OUT and the summary is printed; exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.multiprocess
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("GPU_WHEELS", None)
    done = subprocess.run(["bash", "launch/gpu_check.sh"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("environment", "cuda_tier", "bench_head", "bench_train"):
        assert f"ok    {step}" in done.stdout, step
    for name in ("head", "train"):
        records = json.loads((tmp_path / f"{name}.json").read_text())
        assert records and all(r["hardware"] for r in records if r.get("kind") != "capacity")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    head = json.loads((tmp_path / "head.json").read_text())
    assert any(r.get("kind") == "capacity" and r["budget_mb"] == 1024 for r in head)
    assert "no CUDA (CPU)" in (tmp_path / "summary.md").read_text()


@pytest.mark.multiprocess
def test_a_failed_step_is_reported_and_the_rest_still_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(tmp_path), PYTHON="false")
    done = subprocess.run(["bash", "launch/gpu_check.sh"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    for step in ("environment", "cuda_tier", "bench_head", "bench_train"):
        assert f"FAIL  {step}" in done.stdout, step
    assert (tmp_path / "summary.md").exists()
