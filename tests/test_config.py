"""Typed configs: overrides, clear errors naming the key, the shipped configs load."""

import glob

import pytest

from partialfc.train.config import ConfigError, load_config


def test_overrides_are_typed_and_applied():
    cfg = load_config("configs/demo.yaml", ["optim.lr=0.05", "train.max_steps=7", "loss.params.s=30.0"])
    assert cfg.optim.lr == 0.05 and cfg.train.max_steps == 7 and cfg.loss.params == {"s": 30.0, "m": 0.3}
    assert cfg.model.backbone == "iresnet_tiny"


@pytest.mark.parametrize("overrides, key", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["train.grad_accum=two"], "train.grad_accum"),
    (["train.precision=fp8"], "train.precision"),
    (["model.backbone=resnet9000"], "model.backbone"),
    (["loss.params={q: 1}"], "q"),
    (["data.batch_size=0"], "data.batch_size"),
    (["optim.lr"], "key=value"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo.yaml", overrides)


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\ndata:\n  rec: x\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="data.batchsize"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, ["run_dir=r"])


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.run_dir


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs must be > 0.0"), ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps must be >= 0"),
    ("head.sample_rate=1.5", r"head.sample_rate must be in \[0.0, 1.0\]"),
    ("optim.schedule.warmup_fraction=2", "optim.schedule.warmup_fraction must be in"),
    ("optim.schedule.milestones=[0.5,2]", "milestones are fractions"), ("optim.betas=[0.9]", "two values"),
    ("train.deepspeed.zero_stage=3", "must be 0, 1 or 2"), ("head.optimizer.lr=-0.1", "head.optimizer.lr must be >= 0"),
])
def test_out_of_range_values_are_config_errors(override, message):
    from partialfc.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["run_dir=/tmp/x", "data.synthetic.num_identities=4", override])
