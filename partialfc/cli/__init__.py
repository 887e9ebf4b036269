"""The ``partialfc`` command: one module per entry below, and the one place where a
:class:`~partialfc.errors.PartialFCError` becomes ``error: <message>`` on stderr and exit code 2.

Two kinds of entries, each in its own module, imported only when named (so ``partialfc
data ...`` never loads the trainer, and a missing optional extra cannot break the others):

- ``GROUPS``: a command group (``partialfc data pack ...``); the module exposes
  ``add_commands(subparsers)`` registering subcommands with ``set_defaults(func=...)``.
- ``COMMANDS``: a single command (``partialfc train CONFIG ...``); the module exposes
  ``add_arguments(parser)`` and ``run(args) -> int``.

Every parser shows an option's default after its help text (:class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys

from partialfc import __version__
from partialfc.errors import PartialFCError

GROUPS = {
    "bench": ("partialfc.cli.bench", "benchmarks: throughput and memory"),
    "data": ("partialfc.cli.data", "datasets: pack, check, shuffle, synth RecordIO"),
    "eval": ("partialfc.cli.eval", "evaluation: verification accuracy on .bin sets"),
    "export": ("partialfc.cli.export", "checkpoint tools: backbone alone, merged class centres"),
}
COMMANDS = {
    "train": ("partialfc.cli.train", "train from a YAML config: partialfc train CONFIG [key=value ...]"),
    "submit": ("partialfc.cli.submit", "render an sbatch script for a training run and submit it"),
    "embed": ("partialfc.cli.embed", "embeddings of image files or folders to a .npy"),
    "plan": ("partialfc.cli.plan", "will it fit? per-GPU memory of a run before submitting it"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``help (default: X)``, except where there is no default to state (None, False, an
    empty list) or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or \
                "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser with :class:`HelpFormatter`; subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(names=None) -> argparse.ArgumentParser:
    parser = Parser(prog="partialfc", description="Partial FC face-recognition training toolkit")
    parser.add_argument("--version", action="version", version=f"partialfc {__version__}")
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
    """Run one command; its exit code, or 2 after printing a :class:`PartialFCError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [argv[0]] if argv and (argv[0] in GROUPS or argv[0] in COMMANDS) else None
    parser = build_parser(names)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after options (partialfc train CONFIG --opt x a=b)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.parse_args(argv)  # argparse's own usage error (exit 2)
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except PartialFCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``partialfc`` process (console script and ``python -m partialfc.cli``): :func:`main`,
    then :func:`exit_process`."""
    exit_process(main())


def exit_process(code: int) -> None:
    """End this process with ``code`` without the interpreter's C++ teardown. A finished
    distributed run could abort there ("terminate called without an active exception": a
    communication thread still joinable while its objects are destroyed), so that Slurm marked
    a completed job FAILED. Output is flushed and the ``atexit`` functions run (loader workers,
    logging) first."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
