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

from partialfc.errors import ConfigError, DistributedError, LaunchError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for a local group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_of(group: dist.ProcessGroup | None = None) -> str:
    return dist.get_backend(group) if is_initialized() else "none"


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "slurm" or "single"

    @property
    def gpu_index(self) -> int:
        """This rank's GPU among those the process can see: ``local_rank`` when the node's GPUs
        are all visible, 0 when the scheduler binds one per task (Slurm's ``--gpus-per-task=1``,
        ``--gpu-bind``)."""
        visible = torch.cuda.device_count()
        if visible == 1:
            return 0
        if 0 < visible <= self.local_rank:
            raise LaunchError(f"local rank {self.local_rank} but this process sees {visible} GPUs "
                              "(CUDA_VISIBLE_DEVICES or the scheduler's GPU binding): give each task one GPU, "
                              "or each node's tasks all of them")
        return self.local_rank

    @property
    def device(self) -> torch.device:
        """``cuda:<gpu_index>`` when CUDA is present, else the CPU."""
        return torch.device(f"cuda:{self.gpu_index}") if torch.cuda.is_available() else torch.device("cpu")


def export_launch_env(launch: LaunchEnv) -> None:
    """Under ``srun`` (which sets ``SLURM_LOCALID``, not ``LOCAL_RANK``), set ``LOCAL_RANK``
    from the detected layout unless set: DeepSpeed's engine asserts it is there. Other
    launchers set it themselves; one process is left alone."""
    if launch.launcher == "slurm":
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))


def _int(env, name: str) -> int:
    try:
        value = int(env[name])
    except KeyError:
        raise LaunchError(f"{name} is not set") from None
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    if value < 0:
        raise LaunchError(f"{name}={value} is negative")
    return value


def _check(rank: int, world: int, local_rank: int, local_world: int, names: str) -> None:
    if world < 1:
        raise LaunchError(f"{names}: world size {world} < 1")
    if rank >= world:
        raise LaunchError(f"{names}: rank {rank} >= world size {world}")
    if local_rank >= local_world:
        raise LaunchError(f"{names}: local rank {local_rank} >= local world size {local_world}")
    if local_world > world:
        raise LaunchError(f"{names}: local world size {local_world} > world size {world}")


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``), via
    ``scontrol show hostnames`` when available, else a parser of the common forms."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    import re

    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not first:
        raise LaunchError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = first.group(1), first.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_master_port(job_id: int) -> int:
    """A port derived from the job id, so concurrent jobs on a node do not collide."""
    return 15000 + job_id % 20000


def detect_launch_env(env=None) -> LaunchEnv:
    """Read the rank layout from, in order: torchrun / DeepSpeed's launcher (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ...; also when they run inside a SLURM allocation),
    ``srun`` with one task per process (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``),
    or a single process. Raises :class:`LaunchError` on inconsistent variables."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:  # LOCAL_RANK alone (set for DeepSpeed) is one process
        rank, world, local_rank = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        _check(rank, world, local_rank, local_world, "RANK/WORLD_SIZE/LOCAL_RANK")
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError("WORLD_SIZE > 1 but MASTER_ADDR is not set")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else (
            "deepspeed" if "CROSS_RANK" in env else "torchrun")
        return LaunchEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                         _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500, launcher)
    if "SLURM_PROCID" in env:
        rank, world, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        local_world = (int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
                       if env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].isdigit() else world)
        _check(rank, world, local_rank, local_world, "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID")
        if world == 1:
            return LaunchEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
        if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            raise LaunchError(f"running in the batch script of a {world}-task SLURM job, not in a job step: "
                              "start the ranks with srun (or torchrun), or the job waits for ranks that never come")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env:
            addr = slurm_master_addr(env["SLURM_JOB_NODELIST"])
        else:
            raise LaunchError("SLURM_NTASKS > 1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        port = (_int(env, "MASTER_PORT") if "MASTER_PORT" in env
                else slurm_master_port(_int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0))
        return LaunchEnv(rank, world, local_rank, local_world, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


# NCCL's watchdog otherwise takes the process down on a timed-out or failed collective
# (TORCH_NCCL_ASYNC_ERROR_HANDLING's default tears down). Handling 2 only aborts the
# communicator: the hung kernels return, the watchdog's error is set on the work, and the
# rank's next wait or collective raises it (a DistBackendError, which becomes the one-line
# DistributedError). No TORCH_NCCL_BLOCKING_WAIT: it would turn every synchronous
# collective into a host busy-wait, the backward's reduce-scatter included. Set before the
# group is made; a value already in the environment wins.
NCCL_FAULT_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "PARTIALFC_DIST_TIMEOUT"


def resolve_timeout(configured: float = DEFAULT_TIMEOUT_S) -> float:
    """Seconds a rank waits for the others (start-up and every collective): ``$PARTIALFC_DIST_TIMEOUT``
    if set, else ``configured`` (``dist.timeout_s``)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return float(configured)
    try:
        value = float(text)
    except ValueError:
        raise LaunchError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise LaunchError(f"{TIMEOUT_ENV}={text!r} must be > 0")
    return value


# What gloo's RuntimeErrors say when a peer died, hung or was stopped; not every one names gloo
# ("Application timeout caused pair closure" comes bare).
GLOO_PEER_FAILURES = ("gloo", "pair closure", "closed by peer", "reset by peer", "Timed out waiting")


def collective_failure(err: BaseException) -> str | None:
    """The first line of ``err`` (its source location cut) if it says a collective timed out
    or lost a peer (torch's distributed errors, gloo's RuntimeErrors), else None."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, dist.DistError) or any(phrase in text for phrase in GLOO_PEER_FAILURES):
        return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return None


def rendezvous(launch: LaunchEnv, timeout_s: float, report_every_s: float = 30.0) -> dist.Store:
    """The job's store, once every rank has checked in. Rank 0 hosts it and, while ranks are
    missing, logs ``waiting for ranks [...]`` every ``report_every_s``; after ``timeout_s`` each
    rank raises :class:`DistributedError` naming the ranks (or the address) it waited for."""
    import logging
    import time
    from datetime import timedelta

    where = f"{launch.master_addr}:{launch.master_port}"
    # under torchrun the agent hosts the store on MASTER_PORT and keeps it across worker restarts
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                              launch.rank == 0 and not agent, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
    except dist.DistError as err:
        raise DistributedError(f"rank {launch.rank}: no store of rank 0 at {where} within dist.timeout_s="
                               f"{timeout_s:g} s ({str(err).strip().splitlines()[0]})") from None
    store = dist.PrefixStore(f"partialfc/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    store.set(f"joined/{launch.rank}", "1")
    store.add("joined", 1)
    if launch.rank != 0:
        try:
            store.wait(["all_joined"])
        except dist.DistError:
            raise DistributedError(f"rank {launch.rank}: the job's {launch.world_size} ranks did not all join "
                                   f"within dist.timeout_s={timeout_s:g} s (rank 0 at {where} names them)") from None
        return store

    def missing() -> list[int]:
        return [r for r in range(1, launch.world_size) if not store.check([f"joined/{r}"])]

    start = time.monotonic()
    report = start + report_every_s
    while store.add("joined", 0) < launch.world_size:
        now = time.monotonic()
        if now - start > timeout_s or now >= report:
            absent = missing()
        if now - start > timeout_s:
            shown = ", ".join(map(str, absent[:20])) + (f", ... ({len(absent)} in all)" if len(absent) > 20 else "")
            raise DistributedError(f"ranks [{shown}] did not join rank 0 at {where} within dist.timeout_s="
                                   f"{timeout_s:g} s: were they started, and can they reach it?")
        if now >= report:
            logging.getLogger(__name__).warning("waiting for ranks %s to join rank 0 at %s (%.0f s)", absent,
                                                where, now - start)
            report += report_every_s
        time.sleep(0.2)
    store.set("all_joined", "1")
    return store


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchEnv:
    """Initialise the default process group from the launch environment (no-op for one
    process), after every rank checked in (:func:`rendezvous`); ``timeout_s`` also bounds each
    collective. The backend defaults to NCCL when CUDA is available, gloo otherwise."""
    from datetime import timedelta

    launch = detect_launch_env()
    export_launch_env(launch)
    if launch.world_size > 1 and not is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(launch.gpu_index)
            for name, value in NCCL_FAULT_ENV.items():
                os.environ.setdefault(name, value)
        store = rendezvous(launch, timeout_s)
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return launch


def shutdown_distributed(failed: bool = False) -> None:
    """Destroy every process group of this process (the end of a run, on every exit path).
    Left to the interpreter's exit, gloo's worker threads can abort a finished process
    ("terminate called without an active exception"). After a run that ended by an error
    (``failed``) an NCCL group is left to its watchdog: destroying it could wait on a lost peer,
    and not every collective failure is recognised as one (a failure while building the run)."""
    if not is_initialized() or (failed and backend_of() == "nccl"):
        return
    dist.destroy_process_group()


@dataclass(frozen=True)
class CandidateLayout:
    """A world of ``population x group_size`` ranks split into candidates (Search-Softmax).

    Candidate ``c`` is the ranks ``[c*G, (c+1)*G)``; ``group`` is this rank's candidate (a
    complete trainer), ``cross`` the ranks with this ``group_rank`` in every candidate (one
    per candidate, in candidate order). Both are None in a single process."""

    population: int
    group_size: int
    candidate: int
    group_rank: int
    group: dist.ProcessGroup | None
    cross: dist.ProcessGroup | None

    def world_rank(self, candidate: int, group_rank: int) -> int:
        return candidate * self.group_size + group_rank


def candidate_groups(population: int) -> CandidateLayout:
    """Collective: create the candidates' groups and the cross groups with
    ``torch.distributed.new_group`` (every rank creates every group, in the same order).
    Raises :class:`ConfigError` naming ``search.population`` unless it divides the world size."""
    world, rank = get_world_size(), get_rank()
    if population < 1 or world % population:
        raise ConfigError(f"search.population={population} must divide the world size {world} "
                          "(world = population x ranks per candidate)")
    size = world // population
    group = cross = None
    if world > 1:
        for c in range(population):
            made = dist.new_group(list(range(c * size, (c + 1) * size)))
            group = made if c == rank // size else group
        for i in range(size):
            made = dist.new_group(list(range(i, world, size)))
            cross = made if i == rank % size else cross
    return CandidateLayout(population, size, rank // size, rank % size, group, cross)
