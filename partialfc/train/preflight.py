"""Checks of a training config that need no dataset, model weights or process group, run
before any of them is prepared (``partialfc train``, :class:`~partialfc.train.trainer.Trainer`),
so that a mistake costs seconds and one line, not a dataset pass or a model build.

Checked here: the optional dependencies the config asks for (DALI, DeepSpeed, wandb), the
backbone's options (the backbone built on the ``meta`` device: no memory, no weights), an
explicit ``checkpoint.resume`` (and ``resume=none`` over existing checkpoints), and
``checkpoint.init_backbone``. Key names and value ranges (loss parameters included) are
checked when the config is loaded (:func:`partialfc.train.config.load_config`).
"""

from __future__ import annotations

import os

import torch

from partialfc.errors import ConfigError
from partialfc.extras import require
from partialfc.models import build_backbone
from partialfc.train.checkpoint import resolve_checkpoint
from partialfc.train.config_schema import Config, Engine, Loader, ModelConfig
from partialfc.train.logging import wandb_mode
from partialfc.train.state import resume_path


def check_dependencies(cfg: Config) -> None:
    """Import what ``cfg`` will use from the extras; a :class:`ConfigError` naming the key and
    the extra to install for the first one missing."""
    if cfg.data.loader == Loader.dali:
        require("nvidia.dali", "data.loader=dali")
    if cfg.train.engine == Engine.deepspeed:
        require("deepspeed", "train.engine=deepspeed")
    mode = wandb_mode(cfg.log.wandb)
    if mode != "disabled":
        require("wandb", f"wandb logging (mode {mode}; log.wandb.mode=disabled turns it off)")


def check_backbone(model: ModelConfig) -> None:
    """``model.options`` accepted by ``model.backbone`` (built on the meta device)."""
    try:
        with torch.device("meta"):
            build_backbone(model.backbone, model.embedding_size, gradient_checkpointing=model.gradient_checkpointing,
                           **dict(model.options))
    except ValueError as err:
        raise ConfigError(f"model.options={dict(model.options)}: {err}") from None


def check_files(cfg: Config) -> None:
    """``checkpoint.init_backbone`` exists and is readable (a directory: holds a complete
    checkpoint); an explicit ``checkpoint.resume`` exists and holds one; ``resume=none`` does
    not start over existing checkpoints."""
    init = cfg.checkpoint.init_backbone
    if init:
        if not os.path.exists(init):
            raise ConfigError(f"checkpoint.init_backbone: {init} not found (an exported backbone or a checkpoint)")
        if not os.access(init, os.R_OK):
            raise ConfigError(f"checkpoint.init_backbone: {init} is not readable")
        if os.path.isdir(init):
            resolve_checkpoint(init)
    how = cfg.checkpoint.resume
    if how not in ("auto", "none") and not os.path.exists(how):
        raise ConfigError(f"checkpoint.resume: {how} not found (a checkpoint, its checkpoints/ directory or "
                          "a run directory; or auto, none)")
    if how != "auto":
        resume_path(cfg)


def preflight(cfg: Config) -> None:
    """Every check above; raises the first failure as a one-line :class:`PartialFCError`."""
    check_files(cfg)
    check_backbone(cfg.model)
    check_dependencies(cfg)
