"""Typed training configuration: YAML files validated against dataclasses, with dotted
command-line overrides (``optim.lr=0.05``).

``load_config(path, overrides)`` returns a :class:`Config`; an unknown key, a wrong type or
an invalid value is a :class:`ConfigError` naming the key. The sections, their fields and
rules are in :mod:`partialfc.train.config_schema`.

A YAML file may start from another one: ``base: other.yaml`` (relative to the file naming
it; bases may have bases) is read first and the file's own keys are merged over it,
mappings key by key (``loss.params`` included), lists and scalars replaced. On the command
line ``loss.params.m=0.4`` changes one key, while ``loss.params={s: 64, m: 0.5}`` replaces the
whole mapping (a loss's parameters are a set; the YAML's others would not fit another loss).
``num_classes`` and ``num_images`` are read from the dataset (``data.num_classes`` only states
the count of a plain-flavour set with sparse labels). File paths (``run_dir``, ``data.rec``,
``data.cache_dir``, ``eval.bins``, ``checkpoint.init_backbone``/``resume``, ``search.reward``) given relative are
made absolute against where the user stood (``load_config(..., cwd=)``; ``partialfc train``).
"""

from __future__ import annotations

import os

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from partialfc.errors import ConfigError
from partialfc.train.config_schema import Config, validate

__all__ = ["Config", "ConfigError", "load_config", "to_yaml"]

REPLACED = ("loss.params",)  # mappings that a whole-mapping override replaces instead of merging into


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return ConfigError(f"{source}: {'key ' + repr(key) + ': ' if key else ''}{reason}")


def _read_chain(path: str) -> list[tuple[str, DictConfig]]:
    """The YAML at ``path`` and the files its ``base:`` keys name, each without its ``base``
    key, the deepest base first."""
    chain: list[tuple[str, DictConfig]] = []
    named_by = None
    while True:
        if any(os.path.realpath(path) == os.path.realpath(p) for p, _ in chain):
            raise ConfigError(f"config {chain[0][0]}: the base files form a cycle: "
                              f"{' -> '.join([*(p for p, _ in chain), path])}")
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} not found" + (f" (the base of {named_by})" if named_by else ""))
        try:
            node = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from None
        if not isinstance(node, DictConfig):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        base = node.pop("base", None)
        chain.append((path, node))
        if base is None:
            return chain[::-1]
        if not isinstance(base, str):
            raise ConfigError(f"config {path}: base must be a file name, got {base!r}")
        path, named_by = os.path.join(os.path.dirname(path), base), path


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                cwd: str | os.PathLike | None = None) -> Config:
    """Read ``path`` (YAML, over its ``base:`` chain; None = defaults), apply ``key=value``
    overrides, validate; with ``cwd`` (the command line passes where the user stood), make
    the file paths absolute against it.

    Returns an OmegaConf-typed :class:`Config` (attribute access; assignments are type-checked)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    layers = [] if path is None else _read_chain(os.fspath(path))
    cfg = OmegaConf.structured(Config)
    try:
        for source, layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        source = "overrides"
        replaced = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip() in REPLACED]
        for key in replaced:
            OmegaConf.update(cfg, key, {}, merge=False)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("run_dir is required (the directory for checkpoints, metrics and logs)")
    validate(OmegaConf.to_object(cfg))
    if cwd is not None:
        _absolute_paths(cfg, os.fspath(cwd))
    return cfg


def _absolute_paths(cfg: Config, cwd: str) -> None:
    """Make the file paths of ``cfg`` absolute against ``cwd``, where the user stood, so that
    they keep their meaning in a launcher or batch script that changes directory."""
    def fix(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(os.path.join(cwd, os.path.expanduser(path)))

    cfg.run_dir, cfg.data.rec, cfg.data.cache_dir = fix(cfg.run_dir), fix(cfg.data.rec), fix(cfg.data.cache_dir)
    cfg.eval.bins = [fix(p) for p in cfg.eval.bins]
    cfg.checkpoint.init_backbone = fix(cfg.checkpoint.init_backbone)
    cfg.search.reward = fix(cfg.search.reward)
    if cfg.checkpoint.resume not in ("auto", "none"):
        cfg.checkpoint.resume = fix(cfg.checkpoint.resume)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)
