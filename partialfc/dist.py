"""Process groups and launch-environment detection.

The head and the trainer call these helpers instead of torch.distributed directly, so
that the same code runs as a single process (no group initialised), under torchrun, under
``srun`` (SLURM variables) or under DeepSpeed's launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def backend_of(group: dist.ProcessGroup | None = None) -> str:
    return dist.get_backend(group) if is_initialized() else "none"


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def detect_launch_env() -> LaunchEnv:
    """Read the rank layout from torchrun/DeepSpeed (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); a single process otherwise."""
    env = os.environ
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         addr, port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return LaunchEnv(0, 1, 0, addr, port, "single")


def init_distributed(backend: str | None = None) -> LaunchEnv:
    """Initialise the default process group from the launch environment (no-op for one
    process). The backend defaults to NCCL when CUDA is available, gloo otherwise."""
    launch = detect_launch_env()
    if launch.world_size > 1 and not is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size)
    return launch
