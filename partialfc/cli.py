"""The ``partialfc`` command.

Two kinds of entries, each in its own module, imported only when named (so ``partialfc
data ...`` never loads the trainer, and a missing optional extra cannot break the others):

- ``GROUPS``: a command group (``partialfc data pack ...``); the module exposes
  ``add_commands(subparsers)`` registering subcommands with ``set_defaults(func=...)``.
- ``COMMANDS``: a single command (``partialfc train CONFIG ...``); the module exposes
  ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

GROUPS = {
    "bench": ("partialfc.bench.cli", "benchmarks: throughput and memory"),
    "data": ("partialfc.data.cli", "datasets: pack, check, shuffle, synth RecordIO"),
    "eval": ("partialfc.eval.cli", "evaluation: verification accuracy on .bin sets"),
    "export": ("partialfc.train.export_cli", "checkpoint tools: backbone alone, merged class centres"),
}
COMMANDS = {
    "train": ("partialfc.train.cli", "train from a YAML config: partialfc train CONFIG [key=value ...]"),
    "submit": ("partialfc.launch.submit", "render an sbatch script for a training run and submit it"),
}


def build_parser(names=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partialfc", description="Partial FC face-recognition training toolkit")
    sub = parser.add_subparsers(dest="entry", required=True, metavar="COMMAND")
    for name in names or [*GROUPS, *COMMANDS]:
        if name in GROUPS:
            module, help_text = GROUPS[name]
            group = sub.add_parser(name, help=help_text)
            importlib.import_module(module).add_commands(group.add_subparsers(dest="command", required=True,
                                                                               metavar="SUBCOMMAND"))
        else:
            module_name, help_text = COMMANDS[name]
            module = importlib.import_module(module_name)
            command = sub.add_parser(name, help=help_text)
            module.add_arguments(command)
            command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [argv[0]] if argv and (argv[0] in GROUPS or argv[0] in COMMANDS) else None
    args = build_parser(names).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
