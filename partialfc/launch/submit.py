"""Batch scripts for ``partialfc submit``: render an sbatch template from ``slurm/`` for a
training run (the command itself, which submits it with ``sbatch``, is :mod:`partialfc.cli.submit`).

Two patterns: ``task-per-gpu`` (srun starts one rank per GPU; ranks from SLURM_* variables)
and ``torchrun`` (one task per node running torchrun). Both ask Slurm for a USR1 warning
before the time limit and requeue themselves after the trainer has checkpointed
(``slurm/preemptible.sh``).
"""

from __future__ import annotations

import os
import re
import shlex
import unicodedata
from pathlib import Path
from string import Template

from partialfc.dist import NCCL_FAULT_ENV
from partialfc.errors import LaunchError

PATTERNS = {"task-per-gpu": "task_per_gpu.sbatch", "torchrun": "torchrun_per_node.sbatch"}
TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


def _check_script_text(args) -> None:
    """:class:`LaunchError` if an option or override that goes into the script as text holds a
    control character (a newline would start a script line of its own)."""
    texts = [("--partition", args.partition), ("--account", args.account), ("--qos", args.qos),
             ("--job-name", args.job_name), ("--nccl-ifname", args.nccl_ifname),
             *(("--sbatch-arg", extra) for extra in args.sbatch_arg), *(("override", o) for o in args.overrides)]
    for option, text in texts:
        if text and any(unicodedata.category(c) == "Cc" for c in text):
            raise LaunchError(f"{option} {text!r} contains a control character; it would change the batch script")


def render(args) -> tuple[str, Path]:
    """``(batch script, run directory)`` for ``args`` (the options of :mod:`partialfc.cli.submit`);
    :class:`LaunchError` on inconsistent options."""
    tasks = args.tasks_per_node or args.gpus_per_node
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if tasks < 1:
        raise LaunchError("no ranks per node: give --gpus-per-node G or, for CPU ranks, --tasks-per-node T")
    if args.gpus_per_node and tasks > args.gpus_per_node:
        raise LaunchError(f"--tasks-per-node {tasks} exceeds --gpus-per-node {args.gpus_per_node}")
    if not TIME_FORMAT.match(args.time):
        raise LaunchError(f"--time {args.time!r} is not [D-]HH:MM:SS")
    _check_script_text(args)
    template_path = args.template_dir / PATTERNS[args.pattern]
    if not template_path.exists():
        raise LaunchError(f"template {template_path} not found (pass --template-dir to the repo's slurm/)")
    config = Path(args.config).resolve()
    if not config.exists():
        raise LaunchError(f"config {args.config} not found")
    run_dir = (args.run_dir or Path("runs") / config.stem).resolve()
    if any(c.isspace() for c in str(run_dir)):  # #SBATCH --output cannot be quoted reliably
        raise LaunchError(f"the run directory {str(run_dir)!r} contains white space; choose another --run-dir")
    job_name = re.sub(r"\s+", "-", args.job_name or f"partialfc-{config.stem}")
    directives = [f"#SBATCH --gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    directives += [f"#SBATCH --{key}={value}" for key, value in
                   (("partition", args.partition), ("account", args.account), ("qos", args.qos)) if value]
    directives += [f"#SBATCH {extra}" for extra in args.sbatch_arg]
    nccl = ["export NCCL_DEBUG=${NCCL_DEBUG:-WARN}", *(f"export {k}={v}" for k, v in NCCL_FAULT_ENV.items())]
    if args.nccl_ifname:
        nccl.append(f"export NCCL_SOCKET_IFNAME={shlex.quote(args.nccl_ifname)}")
    values = dict(
        job_name=job_name, nodes=args.nodes, tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task, cpus_per_node=args.cpus_per_task * tasks, time=args.time,
        signal_seconds=args.signal_seconds, output=run_dir / "slurm-%j.out", extra_directives="\n".join(directives),
        preemptible=shlex.quote(str(template_path.resolve().parent / "preemptible.sh")),
        workdir=shlex.quote(os.getcwd()),
        run_dir=shlex.quote(str(run_dir)),
        nccl_exports="\n".join(nccl), overcommit="--overcommit" if args.overcommit else "",
        python=shlex.quote(args.python), config=shlex.quote(str(config)),
        overrides=" ".join(shlex.quote(o) for o in [*args.overrides, f"run_dir={run_dir}"]),
    )
    return Template(template_path.read_text()).substitute(values), run_dir
