"""``partialfc train CONFIG [key=value ...]``: train from a YAML config with dotted overrides."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 train.max_steps=100")


def run(args) -> int:
    from partialfc.train.config import load_config
    from partialfc.train.preemption import EXIT_PREEMPTED, Preempted
    from partialfc.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        Trainer(cfg).train()
    except Preempted as stop:  # the batch script requeues the job; resume picks this checkpoint
        print(stop, file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
