"""The ``partialfc`` command: a user error is one ``error: ...`` line on stderr and exit code 2,
for every command group, in-process and through the installed console script."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import partialfc
from partialfc.cli import COMMANDS, GROUPS, HelpFormatter, build_parser, main
from partialfc.errors import PartialFCError


def user_errors(tmp: Path) -> list[tuple[list[str], str]]:
    """``(argv, text the message must contain)``: one bad input per command group."""
    config = tmp / "c.yaml"
    config.write_text("seed: 1\n")
    return [
        (["data", "check", str(tmp / "missing")], "missing.rec not found"),
        (["data", "pack", str(tmp / "no_folder"), str(tmp / "out")], "no such folder"),
        (["train", str(tmp / "missing.yaml")], "not found"),
        (["export", "centres", str(tmp / "no_run"), str(tmp / "c.pt")], "no complete checkpoint"),
        (["eval", "verify", "--checkpoint", str(tmp / "no_run"), "--bin", str(tmp / "x.bin")],
         "no complete checkpoint"),
        (["submit", str(config), "--dry-run"], "no ranks per node"),
        (["embed", str(tmp / "no_image.jpg"), "--out", str(tmp / "e.npy"), "--checkpoint", str(tmp / "no_run")],
         "no_image.jpg not found"),
        (["plan", "--identities", "-5", "--gpus-per-node", "8"], "identities must be >= 1"),
    ]


CASES = 8  # len(user_errors(...)); every case runs below


def test_every_entry_but_bench_is_covered(tmp_path):
    assert {argv[0] for argv, _ in user_errors(tmp_path)} == {*GROUPS, *COMMANDS} - {"bench"}
    assert len(user_errors(tmp_path)) == CASES


@pytest.mark.parametrize("case", range(CASES))
def test_user_error_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, message = user_errors(tmp_path)[case]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_other_exceptions_are_not_turned_into_user_errors(monkeypatch):
    """Only PartialFCError is a user error; anything else is a bug and keeps its traceback."""
    import partialfc.cli.data as data_cli

    def raising(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(data_cli, "_index", raising(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "index", "x"])
    monkeypatch.setattr(data_cli, "_index", raising(PartialFCError("bad x")))
    assert main(["data", "index", "x"]) == 2


@pytest.mark.multiprocess
def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("partialfc")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    done = subprocess.run([str(script), "data", "check", str(tmp_path / "missing")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'missing'}.rec not found (dataset given as '{tmp_path / 'missing'}')\n"


def _actions(parser, path=("partialfc",)):
    """``(command path, action)`` for every argument of every command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_argument_has_help_with_its_default():
    parser = build_parser()
    for path, action in _actions(parser):
        name = " ".join(path) + " " + (action.option_strings[0] if action.option_strings else action.dest)
        assert action.help, f"{name} has no help text"
        shown = HelpFormatter("partialfc")._get_help_string(action) % {"default": action.default}
        stated = action.default is None or action.default is False or action.default == []
        assert stated or "default" in shown, f"{name}: the help does not state its default {action.default!r}"
    entries = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shown = " ".join(entries.choices["submit"].format_help().split())
    assert "nodes to allocate (default: 1)" in shown and "(default: None)" not in shown


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"partialfc {partialfc.__version__}\n"


def test_print_config_resolves_names_and_replaces_loss_params(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the packaged config by name, not a file here
    assert main(["train", "demo", "--print-config", "loss.name=arcface", "loss.params={s: 64.0, m: 0.5}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"] == {"name": "arcface", "params": {"s": 64.0, "m": 0.5}}
    assert printed["run_dir"] == str(tmp_path / "runs" / "demo") and not (tmp_path / "runs").exists()
    assert main(["train", "demo", "--print-config", "loss.params={s: 20.0}"]) == 0  # replaced, not merged
    assert yaml.safe_load(capsys.readouterr().out)["loss"]["params"] == {"s": 20.0}
    assert main(["train", "demo", "--print-config", "loss.params.s=20.0"]) == 0  # one key changed
    assert yaml.safe_load(capsys.readouterr().out)["loss"]["params"] == {"s": 20.0, "m": 0.3}
    assert main(["train", "no_such_config"]) == 2
    assert "packaged: " in capsys.readouterr().err


BOMB = """import atexit, os, sys
class Bomb:  # stands for a C++ thread still joinable when the interpreter tears down
    def __del__(self):
        os.abort()
bomb = Bomb()
atexit.register(lambda: print("atexit ran", flush=True))
sys.argv = ["partialfc", "train", "configs/demo.yaml", "--print-config"]
import partialfc.cli as cli
{call}
"""


def test_the_process_ends_without_the_interpreters_teardown():
    """A finished command exits through ``partialfc.cli.entry`` (the console script and
    ``python -m partialfc.cli``): output flushed, atexit functions run, and nothing in the
    interpreter's teardown can turn its exit code into an abort, which a plain ``sys.exit``
    lets happen (a finished 2-rank job aborted there: 'terminate called without an active
    exception', and Slurm marked it FAILED)."""
    import tomllib

    root = Path(partialfc.__file__).parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["partialfc"] == "partialfc.cli:entry"
    assert "entry()" in (root / "partialfc" / "cli" / "__main__.py").read_text()
    runs = {call: subprocess.run([sys.executable, "-c", BOMB.format(call=call)], capture_output=True, text=True,
                                 cwd=root, timeout=120) for call in ("cli.entry()", "sys.exit(cli.main())")}
    ended = runs["cli.entry()"]
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.startswith("run_dir:") and ended.stdout.rstrip().endswith("atexit ran")
    assert runs["sys.exit(cli.main())"].returncode < 0  # the same teardown through sys.exit aborts
