"""A real single-node Slurm cluster (munge + slurmctld + slurmd) for tests.

``SlurmCluster(workdir).start()`` writes a ``slurm.conf`` under ``workdir`` (state, spool,
logs and pid files there too), starts the daemons and waits until the node is idle; clients
find it through ``SLURM_CONF``. ``stop()`` kills the daemons. Needs the Debian packages
``slurmctld slurmd slurm-client munge`` and root (the daemons run as root here).

The daemons' two ports are free when chosen; on a busy machine another process can bind one
before the daemon does, which then exits: ``start()`` tries another pair (``attempts`` in all).

The batch templates derive ``MASTER_PORT`` from the job id (``15000 + id % 20000``), and every
new cluster numbers its jobs from 1: two test sessions on one machine (two CI jobs, or a
developer's run beside CI) would give their job 3 the same port. Each live cluster of the
machine claims its own block of :data:`JOB_IDS_PER_CLUSTER` job ids (``FirstJobId``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "sbatch", "munged")


def slurm_available() -> str | None:
    """``None`` when a cluster can be started here, else the reason it cannot."""
    missing = [p for p in PACKAGES if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


JOB_IDS_PER_CLUSTER = 1000  # 20 blocks span the templates' 20000 ports
CLAIMS = Path(tempfile.gettempdir()) / "partialfc-slurm-job-ids"  # one file per claimed block: its owner's pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_job_block() -> int:
    """A block of job ids no live process of this machine holds: its file is created
    exclusively (a dead owner's is taken over); released by :meth:`SlurmCluster.stop`."""
    CLAIMS.mkdir(exist_ok=True)
    for _ in range(3):
        for block in range(20000 // JOB_IDS_PER_CLUSTER):
            path = CLAIMS / str(block)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(path.read_text() or 0)
                except (OSError, ValueError):
                    continue  # being written by its new owner
                if owner and not _alive(owner):
                    path.unlink(missing_ok=True)  # then the next pass may take it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return block
    raise RuntimeError(f"every block of Slurm job ids under {CLAIMS} is held by a live test session")


def _conf(workdir: Path, host: str, cpus: int, port: int, first_job_id: int = 1) -> str:
    return f"""ClusterName=partialfc-test
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
ReturnToService=2
DefMemPerCPU=1000
JobRequeue=1
KillWait=30
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port_pair() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` (slurmctld's and slurmd's) are free now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("", port))  # the daemons listen on every address
                second.bind(("", port + 1))
            return port
        except (OSError, OverflowError):  # p + 1 is taken (or past 65535): another
            continue


class SlurmCluster:
    def __init__(self, workdir: Path, cpus: int | None = None):
        self.workdir = Path(workdir)
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.workdir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.job_block: int | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, scontrol) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "SlurmCluster":
        for sub in ("state", "spool"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        for _ in range(attempts):
            if self.job_block is None:  # stop() between attempts releases it
                self.job_block = _claim_job_block()
            self.conf.write_text(_conf(self.workdir, self.host, self.cpus, _free_port_pair(),
                                       1 + self.job_block * JOB_IDS_PER_CLUSTER))
            for daemon in ("slurmctld", "slurmd"):
                with open(self.workdir / f"{daemon}.out", "w") as log:  # the daemon keeps its own copy
                    self.procs.append(subprocess.Popen([f"/usr/sbin/{daemon}", "-D", "-f", str(self.conf)],
                                                       stdout=log, stderr=subprocess.STDOUT, env=self.env))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
                if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                    return self
                if any(proc.poll() is not None for proc in self.procs):
                    break  # a daemon exited (its port taken meanwhile?): another pair
                time.sleep(0.5)
            else:
                self.stop()
                raise RuntimeError(f"Slurm did not come up in {timeout:.0f} s; logs in {self.workdir}")
            self.stop()
        raise RuntimeError(f"a Slurm daemon exited at start-up {attempts} times; logs in {self.workdir}")

    @staticmethod
    def _start_munge() -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    def sbatch(self, script: str | Path, *args: str) -> int:
        """Submit a batch script file; return the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True,
                             env=self.env, cwd=self.workdir)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             env=self.env)
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 300.0, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                  "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             until=None) -> dict:
        """The job's fields once its JobState is one of ``states`` or ``until(fields)`` holds (for
        what a poll can miss, such as a state as brief as a requeued job's PENDING)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states or (until is not None and until(info)):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=self.env)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        if self.job_block is not None:
            (CLAIMS / str(self.job_block)).unlink(missing_ok=True)
            self.job_block = None
