"""``partialfc submit CONFIG [key=value ...]``: render an sbatch template from ``slurm/`` and
submit it with ``sbatch``, printing the job id (``--dry-run`` prints the script instead).

Two patterns: ``task-per-gpu`` (srun starts one rank per GPU; ranks from SLURM_* variables)
and ``torchrun`` (one task per node running torchrun). Both ask Slurm for a USR1 warning
before the time limit and requeue themselves after the trainer has checkpointed
(``slurm/preemptible.sh``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parents[2]
PATTERNS = {"task-per-gpu": "task_per_gpu.sbatch", "torchrun": "torchrun_per_node.sbatch"}
TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU ranks)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node)")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="task-per-gpu")
    parser.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per rank")
    parser.add_argument("--time", default="24:00:00", help="time limit ([D-]HH:MM:SS)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--job-name")
    parser.add_argument("--run-dir", type=Path, help="where logs and checkpoints go (default runs/<config name>)")
    parser.add_argument("--signal-seconds", type=int, default=120, help="USR1 warning before the time limit")
    parser.add_argument("--nccl-ifname", help="NCCL_SOCKET_IFNAME for multi-node jobs (e.g. ib0, eth1)")
    parser.add_argument("--overcommit", action="store_true", help="allow more ranks than cores (CPU testing)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH directive, e.g. --mem=0")
    parser.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    parser.add_argument("--template-dir", type=Path, default=REPO / "slurm")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def render(args) -> tuple[str, Path]:
    """``(batch script, run directory)`` for ``args``; ``ValueError`` on inconsistent options."""
    tasks = args.tasks_per_node or args.gpus_per_node
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if tasks < 1:
        raise ValueError("no ranks per node: give --gpus-per-node G or, for CPU ranks, --tasks-per-node T")
    if args.gpus_per_node and tasks > args.gpus_per_node:
        raise ValueError(f"--tasks-per-node {tasks} exceeds --gpus-per-node {args.gpus_per_node}")
    if not TIME_FORMAT.match(args.time):
        raise ValueError(f"--time {args.time!r} is not [D-]HH:MM:SS")
    template_path = args.template_dir / PATTERNS[args.pattern]
    if not template_path.exists():
        raise ValueError(f"template {template_path} not found (pass --template-dir to the repo's slurm/)")
    config = Path(args.config).resolve()
    if not config.exists():
        raise ValueError(f"config {args.config} not found")
    run_dir = (args.run_dir or Path("runs") / config.stem).resolve()
    if any(c.isspace() for c in str(run_dir)):  # #SBATCH --output cannot be quoted reliably
        raise ValueError(f"the run directory {str(run_dir)!r} contains white space; choose another --run-dir")
    job_name = re.sub(r"\s+", "-", args.job_name or f"partialfc-{config.stem}")
    directives = [f"#SBATCH --gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    directives += [f"#SBATCH --{key}={value}" for key, value in
                   (("partition", args.partition), ("account", args.account), ("qos", args.qos)) if value]
    directives += [f"#SBATCH {extra}" for extra in args.sbatch_arg]
    nccl = ["export NCCL_DEBUG=${NCCL_DEBUG:-WARN}", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1"]
    if args.nccl_ifname:
        nccl.append(f"export NCCL_SOCKET_IFNAME={shlex.quote(args.nccl_ifname)}")
    values = dict(
        job_name=job_name, nodes=args.nodes, tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task, cpus_per_node=args.cpus_per_task * tasks, time=args.time,
        signal_seconds=args.signal_seconds, output=run_dir / "slurm-%j.out", extra_directives="\n".join(directives),
        repo=shlex.quote(str(args.template_dir.resolve().parent)), run_dir=shlex.quote(str(run_dir)),
        nccl_exports="\n".join(nccl), overcommit="--overcommit" if args.overcommit else "",
        python=shlex.quote(args.python), config=shlex.quote(str(config)),
        overrides=" ".join(shlex.quote(o) for o in [*args.overrides, f"run_dir={run_dir}"]),
    )
    return Template(template_path.read_text()).substitute(values), run_dir


def run(args) -> int:
    try:
        script, run_dir = render(args)
    except ValueError as err:
        print(f"partialfc submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"partialfc submit: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode or 1
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {path}")
    return 0
