"""The ``partialfc`` command: a user error is one ``error: ...`` line on stderr and exit code 2,
for every command group, in-process and through the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from partialfc.cli import COMMANDS, GROUPS, main
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
    ]


def test_every_entry_but_bench_is_covered(tmp_path):
    assert {argv[0] for argv, _ in user_errors(tmp_path)} == {*GROUPS, *COMMANDS} - {"bench"}


@pytest.mark.parametrize("case", range(6))
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
