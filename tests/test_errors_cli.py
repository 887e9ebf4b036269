"""User errors of the commands found before expensive work, as one ``error: ...`` line and exit
code 2: ``partialfc submit`` options that would inject script lines, overrides validated before
``sbatch``, and the run directory the user asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from partialfc.cli import main


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ndata:\n  synthetic: {}\n")
    return path


def user_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), (out, err)
    return err


@pytest.mark.parametrize("option", ["--partition", "--account", "--qos", "--sbatch-arg", "--job-name"])
@pytest.mark.parametrize("bad", ["gpu\n#SBATCH --uid=0", "gpu\rx", "gpu\x00", "gpu\nsrun evil"])
def test_a_control_character_in_a_directive_is_refused(config, capsys, option, bad):
    err = user_error(["submit", str(config), "--tasks-per-node", "1", option, bad, "--dry-run"], capsys)
    assert option in err and "control character" in err


def test_a_control_character_in_an_override_is_refused(config, capsys):
    err = user_error(["submit", str(config), "--tasks-per-node", "1", "log.wandb.name=a\nb", "--dry-run"], capsys)
    assert "control character" in err


def test_overrides_are_validated_before_sbatch(config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: reaching it would be another error
    err = user_error(["submit", str(config), "train.steps=5", "--tasks-per-node", "1"], capsys)
    assert "train.steps" in err and "max_steps" in err
    assert not list(tmp_path.glob("**/*.sbatch"))


def test_overrides_anywhere_and_the_run_dir_they_name(config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["submit", str(config), "--tasks-per-node", "1", "optim.lr=0.5", "--dry-run", "run_dir=mine"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "optim.lr=0.5" in script and f"run_dir={tmp_path / 'mine'}" in script and "run_dir=runs" not in script
    assert f"#SBATCH --output={tmp_path / 'mine'}/slurm-%j.out" in script
    assert main([*argv, "--run-dir", "other"]) == 0  # the option wins over the override
    assert f"run_dir={tmp_path / 'other'}" in capsys.readouterr().out.split("\n")[-2]


def test_an_unknown_option_is_still_a_usage_error(config, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["submit", str(config), "--tasks-per-node", "1", "--no-such-option"])
    assert stop.value.code == 2
