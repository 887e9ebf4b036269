"""``partialfc train CONFIG [key=value ...]``: train from a YAML config with dotted overrides."""

from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file, or the name of a packaged one (demo, ms1mv3_r50_arcface, "
                                       "...: configs/ of the repository)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 train.max_steps=100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, overrides applied) and exit without training")


def run(args) -> int:
    from partialfc import dist as pdist
    from partialfc.resources import resolve_config
    from partialfc.train.config import load_config, to_yaml
    from partialfc.train.preemption import EXIT_PREEMPTED, Preempted
    from partialfc.train.trainer import Trainer

    cfg = load_config(resolve_config(args.config), args.overrides, cwd=os.getcwd())  # paths mean what they said here
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    ended_cleanly = False
    try:
        Trainer(cfg).train()
        ended_cleanly = True
    except Preempted as stop:  # the batch script requeues the job; resume picks this checkpoint
        ended_cleanly = True
        print(stop, file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        pdist.shutdown_distributed(failed=not ended_cleanly)
    return 0
