"""Typed configs: overrides, clear errors naming the key, the shipped configs load."""

import dataclasses
import glob
import os
import re

import pytest
import yaml
from omegaconf import OmegaConf

from partialfc.train.config import Config, ConfigError, load_config, to_yaml


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
    ("train.engine=deepspeed train.precision=fp16", "train.precision=fp16 is not supported by train.engine=deepspeed"),
    ("data.synthetic.verification_identities=1", "data.synthetic.verification_identities must be >= 2"),
    ("data.synthetic.images_per_identity=0", "data.synthetic.images_per_identity must be >= 1"),
])
def test_out_of_range_values_are_config_errors(override, message):
    from partialfc.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["run_dir=/tmp/x", "data.synthetic.num_identities=4", *override.split()])


def test_choices_name_the_key_and_the_valid_values():
    with pytest.raises(ConfigError, match=r"train\.precision.*'fp8'.*\[auto, bf16, fp16, fp32\]"):
        load_config("configs/demo.yaml", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"head\.optimizer\.schedule\.name.*\[poly, cosine, step, constant\]"):
        load_config("configs/demo.yaml", ["head.optimizer.schedule.name=linear"])
    cfg = load_config("configs/demo.yaml", ["train.precision=bf16", "log.wandb.mode=disabled"])
    assert cfg.train.precision == "bf16" and f"{cfg.log.wandb.mode}" == "disabled"
    assert {"bf16": 1}[cfg.train.precision] == 1 and "precision: bf16" in to_yaml(cfg)


# every closed set of options a config has: key, its enum class (by name), the valid values in order
CHOICES = [
    ("data.loader", "Loader", ["torch", "dali"]),
    ("data.on_bad_image", "OnBadImage", ["error", "skip"]),
    ("train.precision", "Precision", ["auto", "bf16", "fp16", "fp32"]),
    ("train.engine", "Engine", ["ddp", "deepspeed"]),
    ("optim.name", "OptimizerName", ["sgd", "adamw"]),
    ("optim.schedule.name", "ScheduleName", ["poly", "cosine", "step", "constant"]),
    ("head.optimizer.name", "OptimizerName", ["sgd", "adamw"]),
    ("head.optimizer.schedule.name", "ScheduleName", ["poly", "cosine", "step", "constant"]),
    ("head.fused", "Implementation", ["auto", "plain", "torch", "triton"]),
    ("head.storage", "Storage", ["fp32", "bf16"]),
    ("log.wandb.mode", "WandbMode", ["offline", "online", "disabled"]),
    ("search.mode", "SearchMode", ["search", "random"]),
]


@pytest.mark.parametrize("key, enum, values", CHOICES)
def test_each_choice_is_a_choice_enum_class_with_its_values(key, enum, values):
    import enum as enum_module

    from partialfc.choices import Choice
    from partialfc.ops.implementation import Implementation
    from partialfc.train import config_schema

    klass = Implementation if enum == "Implementation" else getattr(config_schema, enum)
    assert isinstance(klass, enum_module.EnumMeta) and issubclass(klass, Choice) and klass.__name__ == enum
    assert [m.value for m in klass] == [m.name for m in klass] == values
    cfg = load_config("configs/demo.yaml", [f"{key}={values[-1]}"])
    chosen = OmegaConf.select(cfg, key)  # the field is typed by the class: the string becomes its member
    assert chosen is klass[values[-1]] and chosen == values[-1] and str(chosen) == values[-1]
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [f"{key}=nonsense"])
    message = str(err.value)
    assert "\n" not in message and f"'{key}'" in message and "'nonsense'" in message
    assert f"[{', '.join(values)}]" in message


def test_the_choices_above_are_every_enum_field_of_the_config():
    import dataclasses
    import typing

    from partialfc.choices import Choice

    def enum_keys(klass, prefix=""):
        for f in dataclasses.fields(klass):
            hint = typing.get_type_hints(klass)[f.name]
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
            if dataclasses.is_dataclass(hint):
                yield from enum_keys(hint, f"{prefix}{f.name}.")
            elif isinstance(hint, type) and issubclass(hint, Choice):
                yield f"{prefix}{f.name}"

    assert sorted(enum_keys(Config)) == sorted(key for key, _, _ in CHOICES)


def test_wandb_mode_defaults_to_unset():
    assert load_config("configs/demo.yaml").log.wandb.mode is None  # the environment decides


def _leaves(tree, prefix=""):
    """{dotted key: value} of a nested mapping; lists and scalars are leaves, empty mappings none."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}


VARIANTS = [p for p in sorted(glob.glob("configs/*.yaml")) if "base" in yaml.safe_load(open(p))]


def test_shipped_configs_are_a_base_and_variants():
    assert len(VARIANTS) >= 10 and "configs/demo.yaml" not in VARIANTS


@pytest.mark.parametrize("path", VARIANTS)
def test_a_variant_only_overrides_what_it_says(path):
    own = yaml.safe_load(open(path))
    parent = os.path.join(os.path.dirname(path), own.pop("base"))
    said = _leaves(own)
    mine = _leaves(OmegaConf.to_container(load_config(path)))
    theirs = _leaves(OmegaConf.to_container(load_config(parent, ["run_dir=parent"])))
    changed = {k for k in mine.keys() | theirs.keys() if mine.get(k, "absent") != theirs.get(k, "absent")}
    assert changed <= said.keys()
    assert all(mine[k] == v for k, v in said.items())


def test_base_files_chain_relative_to_the_naming_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "root.yaml").write_text(
        "run_dir: r\ndata: {rec: x}\nloss: {name: cosface, params: {s: 30.0, m: 0.2}}\neval: {bins: [a, b]}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: root.yaml\noptim: {lr: 0.3}\neval: {bins: [c]}\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\nloss: {params: {m: 0.35}}\n")
    cfg = load_config(str(tmp_path / "top.yaml"), ["optim.momentum=0.5"])
    assert cfg.loss.params == {"s": 30.0, "m": 0.35} and cfg.loss.name == "cosface"  # mappings merge key by key
    assert cfg.eval.bins == ["c"] and cfg.optim.lr == 0.3 and cfg.optim.momentum == 0.5  # lists replaced
    assert "base" not in to_yaml(cfg)

    (tmp_path / "sub" / "root.yaml").write_text("base: ../top.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*top\.yaml -> .*mid\.yaml -> .*root\.yaml -> .*top\.yaml"):
        load_config(str(tmp_path / "top.yaml"))
    (tmp_path / "sub" / "root.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml not found \(the base of .*root\.yaml\)"):
        load_config(str(tmp_path / "top.yaml"))
    (tmp_path / "sub" / "root.yaml").write_text("run_dir: r\ndata: {rec: x, batchsize: 3}\n")
    with pytest.raises(ConfigError, match=r"root\.yaml: key 'data\.batchsize'"):  # the file holding the bad key
        load_config(str(tmp_path / "top.yaml"))


def _training_yaml_blocks():
    """(file, text) of every ```yaml block in the docs whose top-level keys are Config sections."""
    sections = {f.name for f in dataclasses.fields(Config)}
    for doc in sorted(glob.glob("docs/*.md")) + ["README.md"]:
        for text in re.findall(r"^```ya?ml\n(.*?)^```", open(doc).read(), re.S | re.M):
            tree = yaml.safe_load(text)
            if isinstance(tree, dict) and set(tree) & sections:
                yield doc, text


def test_docs_yaml_examples_load(tmp_path):
    blocks = list(_training_yaml_blocks())
    assert blocks, "the docs show at least one training config"
    for i, (doc, text) in enumerate(blocks):
        tree, path = yaml.safe_load(text), tmp_path / f"{i}.yaml"
        path.write_text(text)
        missing = [] if "run_dir" in tree else ["run_dir=r"]
        if not {"rec", "synthetic"} & set(tree.get("data") or {}):
            missing.append("data.rec=unused")
        try:
            load_config(str(path), missing)
        except ConfigError as err:
            pytest.fail(f"the YAML example in {doc} is rejected: {err}")
