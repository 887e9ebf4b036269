"""User errors of the commands found before expensive work, as one ``error: ...`` line and exit
code 2: ``partialfc submit`` options that would inject script lines, overrides validated before
``sbatch``, and the run directory the user asked for; ``partialfc train`` on a bad or empty
dataset, a truncated ``.bin``, a missing optional dependency, and the preflight checks
(``train/preflight.py``) that fail before the dataset is opened or a model is built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from partialfc.cli import main
from tests.train_helpers import tiny_overrides


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


def test_a_template_dir_of_any_name_sources_its_own_preemptible_sh(config, capsys, tmp_path):
    from partialfc.resources import SLURM

    mine = tmp_path / "my templates"
    shutil.copytree(SLURM, mine)
    assert main(["submit", str(config), "--tasks-per-node", "1", "--template-dir", str(mine), "--dry-run"]) == 0
    source = [line for line in capsys.readouterr().out.splitlines() if line.startswith("source ")]
    assert source == [f"source '{mine}/preemptible.sh'"]


def test_synth_with_one_verification_identity_is_one_line_and_writes_nothing(tmp_path, capsys):
    err = user_error(["data", "synth", str(tmp_path / "s"), "--identities", "2", "--images-per-identity", "1",
                      "--verification-identities", "1", "--verification-pairs", "4", "--workers", "1"], capsys)
    assert "at least 2" in err and list(tmp_path.iterdir()) == []


def test_an_unknown_option_is_still_a_usage_error(config, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["submit", str(config), "--tasks-per-node", "1", "--no-such-option"])
    assert stop.value.code == 2


# --- partialfc train ---------------------------------------------------------------------------

def train_error(tmp_path, cache, capsys, *extra) -> str:
    """The one line of ``partialfc train`` on the tiny run with ``extra`` overrides."""
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    return user_error(["train", str(config), *tiny_overrides(tmp_path / "run", cache, *extra)], capsys)


@pytest.mark.parametrize("index", [b"0\t0\n1\t64\n", None])
def test_a_garbage_rec_is_one_line_naming_the_file(tmp_path, cache, capsys, index):
    garbage = np.random.default_rng(0).bytes(4096)
    (tmp_path / "g.rec").write_bytes(garbage)
    (tmp_path / "g.idx").write_bytes(index if index is not None else garbage)
    err = train_error(tmp_path, cache, capsys, f"data.rec={tmp_path / 'g.rec'}", "data.synthetic=null")
    assert str(tmp_path / ("g.rec" if index is not None else "g.idx")) in err, err


def test_an_empty_dataset_is_one_line(tmp_path, cache, capsys):
    (tmp_path / "e.rec").write_bytes(b"")
    (tmp_path / "e.idx").write_bytes(b"")
    err = train_error(tmp_path, cache, capsys, f"data.rec={tmp_path / 'e'}", "data.synthetic=null")
    assert f"{tmp_path / 'e.rec'}: the dataset holds no images" in err


@pytest.mark.parametrize("extra,message", [
    (["data.batch_size=100000"], "images give no full batch of 100000"),
    (["train.grad_accum=1000"], "train.grad_accum=1000 is more than the")])
def test_a_dataset_too_small_for_one_step_is_one_line(tmp_path, cache, capsys, extra, message):
    assert message in train_error(tmp_path, cache, capsys, *extra)


def test_a_truncated_bin_in_eval_bins_is_one_line_naming_it(tmp_path, cache, capsys):
    whole = next(Path(cache).glob("synthetic-*/synthetic.bin")).read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole[:len(whole) // 2])
    err = train_error(tmp_path, cache, capsys, f"eval.bins=[{cut}]")
    assert str(cut) in err


# Each preflight case names a dataset that does not exist: the preflight error comes first,
# before the dataset is looked at, a process group or a model is made (the trainer's steps
# that do so fail the test if reached), or the run dir written.
PREFLIGHT = [
    (["model.options={nosuch: 1}"], "model.options={'nosuch': 1}: invalid options"),
    (["model.options={dropout: 2.0}"], "model.options={'dropout': 2.0}: dropout probability"),
    (["loss.params={s: 16.0, m: 1.0}"], "loss.params: invalid parameters for loss 'cosface': CosFace margin m "
                                        "must lie in [0, 1), got 1.0"),
    (["loss.name=arcface", "loss.params={m: 3.2}"], "loss.params: invalid parameters for loss 'arcface': ArcFace "
                                                    "margin m must lie in [0, pi)"),
    (["loss.params={s: 0.0}"], "loss.params: invalid parameters for loss 'cosface': scale s must be > 0"),
    (["checkpoint.resume={tmp}/gone"], "checkpoint.resume: {tmp}/gone not found"),
    (["checkpoint.resume={tmp}"], "no complete checkpoint at {tmp} "),
    (["checkpoint.init_backbone={tmp}/gone.pt"], "checkpoint.init_backbone: {tmp}/gone.pt not found"),
    (["checkpoint.init_backbone={tmp}"], "no complete checkpoint at {tmp} "),
]


@pytest.fixture
def expensive_work_fails(monkeypatch):
    """The trainer's process group, dataset and model raise if the trainer gets to them."""
    import partialfc.dist
    import partialfc.train.trainer as trainer

    def reached(what):
        def stub(*args, **kwargs):
            raise AssertionError(f"the trainer reached {what} before the preflight failed")
        return stub

    monkeypatch.setattr(partialfc.dist, "init_distributed", reached("the process group"))
    monkeypatch.setattr(trainer, "prepare_dataset", reached("the dataset"))
    monkeypatch.setattr(trainer, "build_backbone_for", reached("the model"))


@pytest.mark.parametrize("extra,message", PREFLIGHT)
def test_preflight_fails_before_the_dataset_and_the_model(tmp_path, cache, capsys, expensive_work_fails,
                                                          extra, message):
    err = train_error(tmp_path, cache, capsys, f"data.rec={tmp_path / 'missing'}", "data.synthetic=null",
                      *(e.replace("{tmp}", str(tmp_path)) for e in extra))
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "run").exists()


def test_resume_none_over_checkpoints_fails_before_the_dataset(tmp_path, cache, capsys):
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004" / "trainer.pt").write_bytes(b"")
    err = train_error(tmp_path, cache, capsys, f"data.rec={tmp_path / 'missing'}", "data.synthetic=null",
                      "checkpoint.resume=none")
    assert "checkpoint.resume=none but" in err and "checkpoint.overwrite=true" in err


# The message names what asks for the module: the override for DALI and DeepSpeed; for wandb,
# which is on unless disabled, the feature, its mode and how to turn it off.
@pytest.mark.parametrize("module,extra,start,install", [
    ("nvidia.dali", "data.loader=dali", "error: data.loader=dali needs nvidia.dali, which cannot be imported (",
     "; install it with: pip install 'partialfc[dali]'"),
    ("deepspeed", "train.engine=deepspeed", "error: train.engine=deepspeed needs deepspeed, which cannot be imported (",
     "; install it with: pip install 'partialfc[deepspeed]'\n"),
    ("wandb", "log.wandb.mode=offline", "error: wandb logging (mode offline; log.wandb.mode=disabled turns it off) "
     "needs wandb, which cannot be imported (", "; install it with: pip install 'partialfc[wandb]'\n")])
def test_a_missing_optional_dependency_names_its_extra(tmp_path, cache, capsys, monkeypatch, module, extra, start,
                                                       install):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    err = train_error(tmp_path, cache, capsys, f"data.rec={tmp_path / 'missing'}", "data.synthetic=null", extra)
    assert err.startswith(start), err
    assert install in err and not (tmp_path / "run").exists(), err


@pytest.mark.multiprocess
def test_the_console_script_without_wandb(tmp_path, cache):
    """The installed ``partialfc`` in a fresh process whose ``import wandb`` fails
    (``sitecustomize`` puts None in ``sys.modules``)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    (tmp_path / "c.yaml").write_text("seed: 1\n")
    script = shutil.which("partialfc", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    env.pop("WANDB_MODE", None)
    done = subprocess.run([script, "train", str(tmp_path / "c.yaml"),
                           *tiny_overrides(tmp_path / "run", cache, "log.wandb.mode=null")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: wandb logging (mode offline;")
    assert "pip install 'partialfc[wandb]'" in done.stderr and not (tmp_path / "run").exists()
