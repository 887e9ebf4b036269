"""Launch-environment detection for every launcher, including inconsistent variables."""

from __future__ import annotations

import pytest

from partialfc.dist import LaunchError, detect_launch_env, slurm_master_addr, slurm_master_port

TORCHRUN = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="10.1.2.3",
                MASTER_PORT="29400", TORCHELASTIC_RUN_ID="abc")
DEEPSPEED = dict(RANK="5", WORLD_SIZE="6", LOCAL_RANK="2", MASTER_ADDR="host-a", MASTER_PORT="29500",
                 CROSS_RANK="1", CROSS_SIZE="2", LOCAL_SIZE="3")
SRUN = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="4(x2)",
            SLURM_JOB_NODELIST="gpu[012-013]", SLURM_JOB_ID="4242", SLURM_STEP_ID="0")


def test_single_process():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun():
    env = detect_launch_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("10.1.2.3", 29400, "torchrun")


def test_deepspeed_launcher():
    env = detect_launch_env(DEEPSPEED)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 6, 2, "deepspeed")


def test_srun_one_task_per_process():
    env = detect_launch_env(SRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu012" and env.master_port == slurm_master_port(4242)
    assert env.launcher == "slurm"


def test_torchrun_inside_slurm_allocation_wins():
    env = detect_launch_env({**SRUN, **TORCHRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    assert (env.rank, env.world_size, env.launcher) == (3, 8, "torchrun")


def test_single_task_slurm_job_is_single_process():
    env = detect_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="1"))
    assert (env.world_size, env.launcher) == (1, "single")


def test_explicit_master_overrides_slurm_nodelist():
    env = detect_launch_env({**SRUN, "MASTER_ADDR": "login1", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("login1", 1234)


@pytest.mark.parametrize("nodelist, first", [("node[01-04],gpu7", "node01"), ("gpu7", "gpu7"),
                                             ("a[3,5-7]", "a3"), ("x-1,x-2", "x-1")])
def test_slurm_nodelist_first_host(nodelist, first):
    assert slurm_master_addr(nodelist) == first


@pytest.mark.parametrize("env, message", [
    ({**TORCHRUN, "RANK": "8"}, "rank 8 >= world size 8"),
    ({k: v for k, v in TORCHRUN.items() if k != "RANK"}, "RANK is not set"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, "not an integer"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4 >= local world size 4"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "16"}, "local world size 16 > world size 8"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
    ({**SRUN, "SLURM_PROCID": "8"}, "rank 8 >= world size 8"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS is not set"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
    ({**SRUN, "SLURM_LOCALID": "-1"}, "negative"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, "not in a job step: start the ranks with srun"),
])
def test_inconsistent_variables_are_clear_errors(env, message):
    with pytest.raises(LaunchError, match=message):
        detect_launch_env(env)


def test_local_rank_alone_is_a_single_process():
    assert detect_launch_env({"LOCAL_RANK": "0"}).launcher == "single"


@pytest.mark.parametrize("text,reason", [
    # what gloo raised in a loaded CI run when the peer was stopped (DDP's buffer broadcast)
    ("Application timeout caused pair closure", "Application timeout caused pair closure"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:42151",
     "Connection closed by peer [127.0.0.1]:42151"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv "
     "operation to complete", "Timed out waiting 5000ms for recv operation to complete"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer", "Connection reset by peer"),
])
def test_gloo_failures_of_a_lost_peer_are_collective_failures(text, reason):
    from partialfc.dist import collective_failure

    assert collective_failure(RuntimeError(text + "\nException raised from ...")) == reason


@pytest.mark.parametrize("text", ["mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)",
                                  "CUDA out of memory. Tried to allocate 2.00 GiB", ""])
def test_other_runtime_errors_are_not_collective_failures(text):
    from partialfc.dist import collective_failure

    assert collective_failure(RuntimeError(text)) is None
