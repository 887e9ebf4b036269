"""``partialfc submit CONFIG [key=value ...]``: render a batch script for a training run
(:func:`partialfc.launch.submit.render`) and submit it with ``sbatch``, printing the job id
(``--dry-run`` prints the script instead)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from partialfc.errors import LaunchError
from partialfc.launch.submit import PATTERNS, render
from partialfc.resources import SLURM, resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config: a YAML file or the name of a packaged one (demo, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU ranks)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node)")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="task-per-gpu",
                        help="task-per-gpu: srun starts every rank; torchrun: one torchrun per node")
    parser.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per rank")
    parser.add_argument("--time", default="24:00:00", help="time limit ([D-]HH:MM:SS)")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    parser.add_argument("--account", help="Slurm account to charge")
    parser.add_argument("--qos", help="Slurm quality of service")
    parser.add_argument("--job-name", help="job name (default partialfc-<config name>)")
    parser.add_argument("--run-dir", type=Path, help="where logs and checkpoints go (default runs/<config name>)")
    parser.add_argument("--signal-seconds", type=int, default=120, help="USR1 warning before the time limit")
    parser.add_argument("--nccl-ifname", help="NCCL_SOCKET_IFNAME for multi-node jobs (e.g. ib0, eth1)")
    parser.add_argument("--overcommit", action="store_true", help="allow more ranks than cores (CPU testing)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH directive, e.g. --mem=0")
    parser.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    parser.add_argument("--template-dir", type=Path, default=SLURM, help="directory of the sbatch templates")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="GPU memory for the pre-check (partialfc plan) that the head fits")
    parser.add_argument("--no-plan", action="store_true", help="skip the memory pre-check")


def chosen_run_dir(args) -> Path:
    """``--run-dir``, else the last ``run_dir=`` override, else ``runs/<config name>``."""
    given = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0].strip() == "run_dir"]
    return Path(args.run_dir or (given[-1] if given else Path("runs") / Path(args.config).stem)).resolve()


def run(args) -> int:
    from partialfc.train.config import load_config

    args.config = resolve_config(args.config)
    args.run_dir = chosen_run_dir(args)
    script, run_dir = render(args)
    cfg = load_config(args.config, [*args.overrides, f"run_dir={run_dir}"], cwd=os.getcwd())  # fails here, not in the job
    if not args.no_plan:
        from partialfc.plan import precheck

        note = precheck(cfg, args.gpus_per_node, args.nodes, args.gpu_memory_gb)
        if note:
            print(note, file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch failed: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {path}")
    return 0
