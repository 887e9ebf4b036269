"""The sections of a training config (:class:`Config`) as dataclasses, and their rules.

Each field carries its own rule: closed sets of options are :class:`~partialfc.choices.Choice`
enums (OmegaConf rejects other values and lists the valid ones), numeric ranges are declared
with :func:`bounded`, and a section's rules across fields are its ``check(key)`` method;
:func:`validate` applies them all. Loading and overrides: :mod:`partialfc.train.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from partialfc.choices import Choice
from partialfc.errors import ConfigError
from partialfc.ops.implementation import Implementation


class Loader(Choice):
    torch = "torch"
    dali = "dali"


class Precision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Engine(Choice):
    ddp = "ddp"
    deepspeed = "deepspeed"


class OptimizerName(Choice):
    sgd = "sgd"
    adamw = "adamw"


class ScheduleName(Choice):
    poly = "poly"
    cosine = "cosine"
    step = "step"
    constant = "constant"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class OnBadImage(Choice):
    error = "error"
    skip = "skip"


class SearchMode(Choice):
    search = "search"
    random = "random"


class Storage(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            note: str = "") -> Any:
    """A dataclass field whose value, unless None, must be ``>= ge`` / ``> gt`` / ``<= le``
    (checked by :func:`validate`; ``note`` is added to the message)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "note": note})


def _check_bounds(key: str, value: Any, ge=None, gt=None, le=None, note: str = "") -> None:
    if value is None:
        return
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        low = f"[{ge}" if gt is None else f"({gt}"
        bound = f"in {low}, {le}]" if le is not None else (f"> {gt}" if gt is not None else f">= {ge}")
        raise ConfigError(f"{key} must be {bound}{f' ({note})' if note else ''}, got {value}")


def validate(section: Any, key: str = "") -> None:
    """Check a config dataclass instance depth first: every field's :func:`bounded` range,
    then the section's own ``check(key)``. Raises :class:`ConfigError` naming the key."""
    for f in fields(section):
        value, name = getattr(section, f.name), f"{key}.{f.name}" if key else f.name
        if is_dataclass(value):
            validate(value, name)
        elif f.metadata:
            _check_bounds(name, value, **f.metadata)
    if hasattr(section, "check"):
        section.check(key)


@dataclass
class SyntheticConfig:
    """A synthetic identity dataset generated on first use (cached under ``data.cache_dir``)."""

    num_identities: int = bounded(200, ge=1)
    images_per_identity: int = bounded(24, ge=1)
    verification_identities: int = bounded(100, ge=2, note="a pair of different identities needs two")
    verification_pairs: int = bounded(1000, ge=0, note="0: no held-out .bin")
    seed: int = 0


@dataclass
class DataConfig:
    rec: Optional[str] = None  # .rec path or prefix; or leave null and give `synthetic`
    synthetic: Optional[SyntheticConfig] = None
    cache_dir: str = "runs/data"
    loader: Loader = Loader.torch
    batch_size: int = bounded(128, ge=1)  # per rank, per micro-step
    num_workers: int = 2
    shuffle: bool = True
    flip: bool = True
    seed: int = 0
    on_bad_image: OnBadImage = OnBadImage.error  # skip: replace an undecodable image, count it (docs/data.md)
    bad_image_budget: int = bounded(100, ge=0)  # with skip: more bad records than this stop the run
    num_classes: Optional[int] = bounded(None, ge=1)  # plain-flavour sets with sparse labels: state the count

    def check(self, key: str) -> None:
        if (self.rec is None) == (self.synthetic is None):
            raise ConfigError(f"give exactly one of {key}.rec (a .rec prefix) and {key}.synthetic")


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = bounded(512, ge=1)
    options: Dict[str, Any] = field(default_factory=dict)  # extra backbone kwargs (dropout, ...)
    gradient_checkpointing: bool = False

    def check(self, key: str) -> None:
        from partialfc.models import BACKBONES

        if self.backbone not in BACKBONES:
            raise ConfigError(f"{key}.backbone={self.backbone!r} is unknown; available: {', '.join(sorted(BACKBONES))}")


@dataclass
class LossConfig:
    name: str = "arcface"
    params: Dict[str, Any] = field(default_factory=dict)

    def check(self, key: str) -> None:
        from partialfc.losses import LOSSES, build_loss

        try:
            build_loss(self.name, **self.params)
        except ValueError as err:
            raise ConfigError(f"{key}.{'params' if self.name in LOSSES else 'name'}: {err}") from None


@dataclass
class ScheduleConfig:
    """LR factor per optimizer step: linear warm-up from 0, then ``name``:
    ``poly`` ((1 - t)^power), ``cosine`` (down to ``min_factor``), ``step`` (times ``gamma``
    at each of ``milestones``, fractions of training in (0, 1)), ``constant``."""

    name: ScheduleName = ScheduleName.poly
    warmup_steps: int = 0
    warmup_fraction: float = bounded(0.0, ge=0.0, le=1.0)  # alternative to warmup_steps: a fraction of all steps
    power: float = 2.0
    min_factor: float = 0.0
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    gamma: float = 0.1

    def check(self, key: str) -> None:
        if any(not 0.0 <= m <= 1.0 for m in self.milestones):
            raise ConfigError(f"{key}.milestones are fractions of training in [0, 1], got {list(self.milestones)}")


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = bounded(0.1, ge=0.0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float = 5.0  # 0 = no clipping
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def check(self, key: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{key}.betas must hold two values, got {list(self.betas)}")


@dataclass
class HeadConfig:
    sample_rate: Optional[float] = bounded(None, ge=0.0, le=1.0)  # null: what the loss implies, else 1.0
    init_std: float = 0.01
    fused: Implementation = Implementation.auto  # PartialFC(fused=...): the chunked loss path (docs/head.md)
    storage: Storage = Storage.fp32  # dtype of the centres and their optimizer state
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


DEEPSPEED_OWNED = {  # DeepSpeed config keys that partialfc writes, and the setting that decides each
    "train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size and train.grad_accum", "gradient_clipping": "optim.clip_grad_norm",
    "bf16": "train.precision", "fp16": "train.precision", "data_types": "train.precision",
    "zero_optimization.stage": "train.deepspeed.zero_stage",
    "zero_optimization.compute_grad_norm": "the trainer's skip (ZeRO-1/2 skip a step on its norm)"}


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)  # merged (nested) into the generated DS config

    def check(self, key: str) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{key}.zero_stage must be 0, 1 or 2 (the head stays outside ZeRO), got {self.zero_stage}")
        for owned, setting in DEEPSPEED_OWNED.items():
            outer, _, inner = owned.partition(".")
            value = self.extra.get(outer)
            if outer in self.extra and (not inner or not isinstance(value, Mapping) or inner in value):
                raise ConfigError(f"{key}.extra.{owned} is written by partialfc from {setting}; remove it from "
                                  f"{key}.extra (bf16 runs check every gradient for overflow and accumulate in fp32)")


@dataclass
class TrainConfig:
    epochs: float = bounded(20.0, gt=0.0)
    max_steps: Optional[int] = bounded(None, ge=1, note="or null to use train.epochs")  # optimizer steps; overrides epochs
    grad_accum: int = bounded(1, ge=1)
    precision: Precision = Precision.auto
    engine: Engine = Engine.ddp
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    max_consecutive_nonfinite: int = 20
    deterministic: bool = False
    threads: int = 0  # torch CPU threads per process; 0 = leave the default
    compile: bool = False  # torch.compile the backbone (inductor); checkpoints and exports stay plain

    def check(self, key: str) -> None:
        if self.engine == Engine.deepspeed and self.precision == Precision.fp16:
            raise ConfigError(f"{key}.precision=fp16 is not supported by {key}.engine=deepspeed; use bf16 or fp32")


@dataclass
class CheckpointConfig:
    every_steps: int = bounded(1000, ge=0)  # 0 = only at the end / on request
    keep: int = bounded(2, ge=0)  # complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto (latest in run_dir if any) | none | a checkpoint path
    init_backbone: Optional[str] = None  # backbone weights to fine-tune from (export or checkpoint)
    overwrite: bool = False  # resume=none on a run_dir holding checkpoints: start over (they get replaced)
    allow_config_change: bool = False  # resume although model.options/loss/head.sample_rate differ from the checkpoint's


@dataclass
class DistConfig:
    timeout_s: float = bounded(600.0, gt=0.0)  # start-up and collectives; env PARTIALFC_DIST_TIMEOUT wins


@dataclass
class WandbConfig:
    """Unset (null) keys take WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY from the environment,
    else ``offline`` / ``partialfc`` / the account's default."""

    mode: Optional[WandbMode] = None
    project: Optional[str] = None
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LogConfig:
    every_steps: int = bounded(50, ge=0)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = True  # PNG of loss / accuracy curves at the end


@dataclass
class EvalConfig:
    every_steps: int = bounded(2000, ge=0)  # 0 = only at the end
    bins: List[str] = field(default_factory=list)  # .bin paths; the synthetic set's is added
    batch_size: int = 128
    at_start: bool = False
    at_end: bool = True


@dataclass
class SearchConfig:
    """Search-Softmax (docs/losses.md): ``population`` candidates of ``world / population``
    ranks each; from ``start_epoch`` each draws ``x ~ N(mu, sigma)`` per epoch and trains
    with ``a = -|x| exp(s/3)``; rewards = verification accuracy on ``reward`` (a ``.bin``;
    null: the synthetic set's held-out pairs). ``mode: random`` draws the same but never
    updates ``mu`` (Random-Softmax in a population)."""

    enabled: bool = False
    population: int = bounded(8, ge=1)
    sigma: float = bounded(0.2, gt=0.0)
    lr: float = bounded(0.05, gt=0.0)
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    start_epoch: int = bounded(2, ge=0)
    mu: float = 0.0
    reward: Optional[str] = None
    mode: SearchMode = SearchMode.search

    def check(self, key: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas must be two values in [0, 1), got {list(self.betas)}")


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
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def check(self, key: str) -> None:
        """Rules across sections (the search's loss, reward set and engine)."""
        if not self.search.enabled:
            return
        if self.loss.name != "search_softmax" or self.loss.params.get("schedule"):
            raise ConfigError(f"search.enabled needs loss.name=search_softmax without a schedule, got "
                              f"loss.name={self.loss.name}")
        if self.search.reward is None and (self.data.synthetic is None or self.data.synthetic.verification_pairs < 1):
            raise ConfigError("search.reward: give the verification .bin whose accuracy is the reward "
                              "(only a synthetic dataset with verification pairs provides a default)")
        if self.train.engine != Engine.ddp:
            raise ConfigError(f"search.enabled needs train.engine=ddp, got {self.train.engine}")
