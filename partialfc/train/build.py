"""The trainer's parts built from the config: backbone, head, search driver, and the run's
description (start-up summary, checkpoint metadata)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from partialfc.errors import CheckpointError
from partialfc.eval.verification import VerificationSet
from partialfc.head import PartialFC
from partialfc.head.sharding import shard_range
from partialfc.losses import build_loss
from partialfc.models import build_backbone
from partialfc.dist import CandidateLayout
from partialfc.train.config import Config, to_yaml
from partialfc.train.engine import BackboneEngine, resolve_precision
from partialfc.train.search import SearchDriver
from partialfc.train.train_state import TrainState


def load_backbone_weights(backbone: torch.nn.Module, path: str) -> None:
    """Initialise from an exported backbone (``partialfc train export-backbone``) or a
    checkpoint; the class count of the run that produced it does not matter."""
    from partialfc.train.artifacts import read_backbone

    state = read_backbone(path)["state_dict"]
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this backbone: {str(err).splitlines()[0]}") from None


def build_backbone_for(cfg: Config, device: torch.device) -> torch.nn.Module:
    """``cfg.model``'s backbone on ``device``, the same initialisation on every rank (seeded by
    ``cfg.seed``), or ``checkpoint.init_backbone``'s weights."""
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size,
                              gradient_checkpointing=cfg.model.gradient_checkpointing,
                              **dict(cfg.model.options)).to(device)
    if cfg.checkpoint.init_backbone:
        load_backbone_weights(backbone, cfg.checkpoint.init_backbone)
    return backbone


def build_head(cfg: Config, num_classes: int, device: torch.device, group) -> PartialFC:
    """The sharded head of ``cfg.head`` with ``cfg.loss``; non-finite embeddings give a NaN
    loss (the trainer skips the step on every rank) instead of an error. Its matmuls run in
    ``train.precision``'s dtype whatever the engine (DeepSpeed runs no autocast). Bounded by
    ``data.batch_size``, it waits for nothing: the trainer checks its inputs in the step's read."""
    return PartialFC(cfg.model.embedding_size, num_classes, loss=build_loss(cfg.loss.name, **dict(cfg.loss.params)),
                     sample_rate=cfg.head.sample_rate, seed=cfg.seed, init_std=cfg.head.init_std, device=device,
                     process_group=group, fused=cfg.head.fused, nonfinite="report",
                     dtype=torch.bfloat16 if str(cfg.head.storage) == "bf16" else torch.float32,
                     compute_dtype=resolve_precision(cfg.train.precision, device)[0], max_batch=cfg.data.batch_size)


def build_search(cfg: Config, layout: CandidateLayout, loss, state: TrainState, engine: BackboneEngine, prefix: str,
                 device: torch.device) -> SearchDriver:
    """The Search-Softmax driver; its reward is the accuracy on ``search.reward`` (default:
    the synthetic set's held-out pairs), evaluated by the candidate's ranks."""
    reward_set = VerificationSet(cfg.search.reward or prefix + ".bin")

    def reward() -> float:
        return reward_set.evaluate(engine.module, group=layout.group, batch_size=cfg.eval.batch_size, device=device,
                                   autocast_dtype=engine.autocast_dtype).accuracy

    return SearchDriver(cfg, layout, loss, state, reward, device)


def run_meta(cfg: Config, head: PartialFC) -> dict:
    """What ``trainer.pt`` says of the run: its config, model, class count and head shards."""
    return {"config": to_yaml(cfg), "num_classes": head.num_classes, "world_size": head.world_size,
            "model": {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                      "options": OmegaConf.to_container(cfg.model.options)},
            "row_shards": [shard_range(head.num_classes, head.world_size, r) for r in range(head.world_size)]}


def describe_run(trainer) -> list[str]:
    """The start-up summary: data, model, loss and head, ranks and precision, steps."""
    cfg = trainer.cfg
    dtype, scaled = resolve_precision(cfg.train.precision, trainer.device)
    data = cfg.data.rec or f"synthetic ({cfg.data.synthetic.num_identities} identities)"
    return [f"run {cfg.run_dir}",
            f"data {data}: {trainer.head.num_classes} classes, {trainer.loader.num_images} images, "
            f"{cfg.data.loader} loader",
            f"model {cfg.model.backbone} ({cfg.model.embedding_size}-d), {cfg.train.engine}",
            f"loss {cfg.loss.name} {dict(cfg.loss.params)}, head sample rate {trainer.head.sample_rate:g}",
            f"world {trainer.world_size} rank(s) on {trainer.device.type}, precision "
            f"{str(dtype or torch.float32).removeprefix('torch.')}{' with loss scaling' if scaled else ''}, "
            f"global batch {cfg.data.batch_size * cfg.train.grad_accum * trainer.world_size}",
            f"steps {trainer.step} -> {trainer.total_steps} ({trainer.steps_per_epoch} per epoch)"]
