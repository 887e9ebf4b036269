"""The ranks as ``srun`` starts them, one task per process: only Slurm's variables
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_STEP_ID``, the node list), no
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: the ``LOCAL_RANK`` DeepSpeed asserts is exported
(issue 25, item 1; trained under real ``srun`` with each engine in tests/test_slurm.py's
launch matrix), and the GPU a rank takes when Slurm binds one per task (item 5)."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from partialfc import dist as pdist
from partialfc.errors import LaunchError
from tests.train_helpers import tiny_overrides

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "CROSS_RANK")


@mock.patch.dict(os.environ)  # what export_launch_env writes is undone after the test
def test_the_local_rank_srun_gives_is_exported_for_the_engines():
    """DeepSpeed reads LOCAL_RANK from the environment: under srun, partialfc sets it from
    SLURM_LOCALID (and never overrides a launcher's own)."""
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    launch = pdist.detect_launch_env({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
                                      "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_STEP_ID": "0",
                                      "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "9"})
    pdist.export_launch_env(launch)
    assert os.environ["LOCAL_RANK"] == "1"
    os.environ["LOCAL_RANK"] = "5"
    pdist.export_launch_env(launch)
    assert os.environ["LOCAL_RANK"] == "5"
    del os.environ["LOCAL_RANK"]
    pdist.export_launch_env(pdist.detect_launch_env({}))  # one process: nothing leaks into the environment
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.parametrize("visible, local_rank, expected", [
    (8, 3, "cuda:3"),  # every GPU of the node visible: the local rank's
    (1, 3, "cuda:0"),  # --gpus-per-task=1 / --gpu-bind: the one this task sees
    (4, 1, "cuda:1"),
])
def test_a_rank_takes_a_gpu_it_can_see(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    launch = pdist.LaunchEnv(local_rank, 8, local_rank, 8, "127.0.0.1", 29500, "slurm")
    assert launch.device == torch.device(expected)


def test_more_local_ranks_than_visible_gpus_is_a_launch_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch = pdist.LaunchEnv(5, 8, 5, 8, "127.0.0.1", 29500, "slurm")
    with pytest.raises(LaunchError, match="local rank 5 .* 2 GPUs"):
        launch.device


@pytest.mark.required
@mock.patch.dict(os.environ)
def test_deepspeed_is_given_the_gpu_the_rank_sees(monkeypatch, tmp_path):
    """Construction (no GPU here): the DeepSpeed engine hands DeepSpeed the device index the
    rank chose (``args.device_rank``), not LOCAL_RANK, which names no GPU under a binding."""
    import deepspeed

    from partialfc.models import build_backbone
    from partialfc.train.config import load_config
    from partialfc.train.engine import DeepSpeedEngine

    seen = {}

    class Stop(Exception):
        pass

    def initialize(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    os.environ.pop("LOCAL_RANK", None)  # the engine sets it for a group of one (mock.patch.dict undoes it)
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path, "train.engine=deepspeed", "train.precision=fp32"))
    was_initialized = torch.distributed.is_initialized()
    try:
        for device, expected in (("cuda:0", 0), ("cuda:3", 3), ("cpu", None)):
            with pytest.raises(Stop):
                DeepSpeedEngine(build_backbone("iresnet_tiny", 32), cfg.optim, cfg.train, micro_batch=4,
                                total_steps=2, device=torch.device(device))
            assert (seen["args"].device_rank if seen["args"] is not None else None) == expected
    finally:
        if torch.distributed.is_initialized() and not was_initialized:
            torch.distributed.destroy_process_group()
