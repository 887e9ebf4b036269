"""Typed training configuration: YAML files validated against dataclasses, with dotted
command-line overrides (``optim.lr=0.05``).

``load_config(path, overrides)`` returns a :class:`Config`; an unknown key, a wrong type or
an invalid value is a :class:`ConfigError` naming the key. ``num_classes`` and
``num_images`` are not configured: they are read from the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from partialfc.errors import ConfigError


@dataclass
class SyntheticConfig:
    """A synthetic identity dataset generated on first use (cached under ``data.cache_dir``)."""

    num_identities: int = 200
    images_per_identity: int = 24
    verification_identities: int = 100
    verification_pairs: int = 1000
    seed: int = 0


@dataclass
class DataConfig:
    rec: Optional[str] = None  # .rec path or prefix; or leave null and give `synthetic`
    synthetic: Optional[SyntheticConfig] = None
    cache_dir: str = "runs/data"
    loader: str = "torch"  # torch | dali
    batch_size: int = 128  # per rank, per micro-step
    num_workers: int = 2
    shuffle: bool = True
    flip: bool = True
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = 512
    options: Dict[str, Any] = field(default_factory=dict)  # extra backbone kwargs (dropout, ...)
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    name: str = "arcface"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """LR factor per optimizer step: linear warm-up from 0, then ``name``:
    ``poly`` ((1 - t)^power), ``cosine`` (down to ``min_factor``), ``step`` (times ``gamma``
    at each of ``milestones``, fractions of training in (0, 1)), ``constant``."""

    name: str = "poly"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # alternative to warmup_steps: a fraction of all steps
    power: float = 2.0
    min_factor: float = 0.0
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    gamma: float = 0.1


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float = 5.0  # 0 = no clipping
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class HeadConfig:
    sample_rate: Optional[float] = None  # null: what the loss implies, else 1.0
    init_std: float = 0.01
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DS config


@dataclass
class TrainConfig:
    epochs: float = 20.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    grad_accum: int = 1
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    engine: str = "ddp"  # ddp | deepspeed
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    max_consecutive_nonfinite: int = 20
    deterministic: bool = False
    threads: int = 0  # torch CPU threads per process; 0 = leave the default


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = only at the end / on request
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto (latest in run_dir if any) | none | a checkpoint path
    init_backbone: Optional[str] = None  # backbone weights to fine-tune from (export or checkpoint)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "partialfc"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LogConfig:
    every_steps: int = 50
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = True  # PNG of loss / accuracy curves at the end


@dataclass
class EvalConfig:
    every_steps: int = 2000  # 0 = only at the end
    bins: List[str] = field(default_factory=list)  # .bin paths; the synthetic set's is added
    batch_size: int = 128
    at_start: bool = False
    at_end: bool = True


@dataclass
class Config:
    run_dir: str = MISSING
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {"data.loader": ("torch", "dali"), "train.precision": ("auto", "bf16", "fp16", "fp32"),
           "train.engine": ("ddp", "deepspeed"), "optim.name": ("sgd", "adamw"),
           "head.optimizer.name": ("sgd", "adamw"), "log.wandb.mode": ("offline", "online", "disabled"),
           "optim.schedule.name": ("poly", "cosine", "step", "constant"),
           "head.optimizer.schedule.name": ("poly", "cosine", "step", "constant")}


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return ConfigError(f"{source}: {'key ' + repr(key) + ': ' if key else ''}{reason}")


def _check(cfg: Config) -> None:
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")
    if (cfg.data.rec is None) == (cfg.data.synthetic is None):
        raise ConfigError("give exactly one of data.rec (a .rec prefix) and data.synthetic")
    positive = {"data.batch_size": cfg.data.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "model.embedding_size": cfg.model.embedding_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    ranges = {"train.epochs": (cfg.train.epochs, 0.0, None, False), "head.sample_rate": (cfg.head.sample_rate, 0.0, 1.0, True),
              "checkpoint.every_steps": (cfg.checkpoint.every_steps, 0, None, True),
              "checkpoint.keep": (cfg.checkpoint.keep, 0, None, True), "log.every_steps": (cfg.log.every_steps, 0, None, True),
              "eval.every_steps": (cfg.eval.every_steps, 0, None, True)}
    for prefix in ("optim", "head.optimizer"):
        opt = OmegaConf.select(cfg, prefix)
        ranges[f"{prefix}.lr"] = (opt.lr, 0.0, None, True)
        ranges[f"{prefix}.schedule.warmup_fraction"] = (opt.schedule.warmup_fraction, 0.0, 1.0, True)
        if len(opt.betas) != 2:
            raise ConfigError(f"{prefix}.betas must hold two values, got {list(opt.betas)}")
        if any(not 0.0 <= m <= 1.0 for m in opt.schedule.milestones):
            raise ConfigError(f"{prefix}.schedule.milestones are fractions of training in [0, 1], "
                              f"got {list(opt.schedule.milestones)}")
    for key, (value, low, high, inclusive) in ranges.items():
        if value is None:
            continue
        if value < low or (value == low and not inclusive) or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else (f">= {low}" if inclusive else f"> {low}")
            raise ConfigError(f"{key} must be {bound}, got {value}")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 (or null to use train.epochs), got {cfg.train.max_steps}")
    if cfg.train.deepspeed.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed.zero_stage must be 0, 1 or 2 (the head stays outside ZeRO), "
                          f"got {cfg.train.deepspeed.zero_stage}")
    from partialfc.losses import build_loss
    from partialfc.models import BACKBONES

    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} is unknown; available: "
                          f"{', '.join(sorted(BACKBONES))}")
    try:
        build_loss(cfg.loss.name, **cfg.loss.params)
    except ValueError as err:
        raise ConfigError(f"loss: {err}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML; None = defaults), apply ``key=value`` overrides, validate.

    Returns an OmegaConf-typed :class:`Config` (attribute access; assignments are type-checked)."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file {path} not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        if OmegaConf.is_missing(cfg, "run_dir"):
            raise ConfigError("run_dir is required (the directory for checkpoints, metrics and logs)")
    except OmegaConfBaseException as err:
        raise _explain(err, str(path) if path else "config") from None
    _check(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def from_yaml(text: str) -> Config:
    """The config stored in a checkpoint (validated again)."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
