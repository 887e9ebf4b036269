"""The ``partialfc`` command.

Each command group lives in its own module, which exposes ``add_commands(subparsers)``
registering its subcommands with ``set_defaults(func=...)``; ``func(args)`` returns the exit
code. Groups are imported only when they are named, so ``partialfc data ...`` never loads
the benchmark code and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys

GROUPS = {
    "bench": ("partialfc.bench.cli", "benchmarks: throughput and memory"),
    "data": ("partialfc.data.cli", "datasets: pack, check, shuffle, synth RecordIO"),
    # "train": ("partialfc.train.cli", ...), "eval": ("partialfc.eval.cli", ...) join here
}


def build_parser(groups=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partialfc", description="Partial FC face-recognition training toolkit")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for name in groups or GROUPS:
        module, help_text = GROUPS[name]
        group_parser = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_commands(group_parser.add_subparsers(dest="command", required=True,
                                                                                  metavar="SUBCOMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the named group (fast start, and a broken optional extra cannot break
    # the other commands); fall back to all of them for help and errors.
    groups = [argv[0]] if argv and argv[0] in GROUPS else None
    args = build_parser(groups).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
