"""What a training checkpoint holds, and how a run comes back from one.

:mod:`partialfc.train.checkpoint` writes the files atomically; this module decides their
contents (format 2). Each holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.

``trainer.pt`` (rank 0, :func:`build_shared`): format, step, skipped_steps, run_id, config
(YAML text), num_classes, world_size, model (backbone, embedding_size, options),
head_shards (``(class_start, num_local)`` of every rank), backbone (the engine's state),
head_schedule, head_param_groups, scaler, data (rank 0's loader position).

``head_rank*.pt`` (every rank, :func:`build_rank_state`): head (``head.state_dict()``: the
shard's rows, its class range and the sampler), optimizer_rows (the head optimizer's per-row
tensors), rng (torch, numpy, python and CUDA generators), data (the loader's position).

:func:`restore` on the same world size gives every rank its own file back (a bitwise-exact
resume). On another world size the head rows and their optimizer rows are gathered from the
saved shards that overlap the new ones, the sampler and torch's generators restart on their
``(seed, rank, step)`` streams, and the loader converts rank 0's position.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from partialfc.errors import CheckpointError
from partialfc.head.sharding import shard_range
from partialfc.seeding import Stream, derive_seed
from partialfc.train import checkpoint as ckpt
from partialfc.train.config import to_yaml
from partialfc.train.optim import sync_schedule

FORMAT = 2


@dataclass(frozen=True)
class Components:
    """The live objects a checkpoint captures and restores."""

    engine: object  # partialfc.train.engine: DDPEngine or DeepSpeedEngine
    head: torch.nn.Module  # PartialFC
    head_optimizer: torch.optim.Optimizer
    head_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: object  # partialfc.data.loader.EpochLoader


class Progress(NamedTuple):
    step: int
    skipped_steps: int
    run_id: str


def seed_rank_stream(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (dropout, ...) with this rank's stream at ``step``."""
    torch.manual_seed(derive_seed(seed, Stream.RANK, rank, step))


def capture_rng() -> dict:
    """The global generators' states as tensors and plain lists/ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(cfg) -> str:
    return os.path.join(cfg.run_dir, "checkpoints")


def resume_path(cfg) -> str | None:
    """The checkpoint that ``checkpoint.resume`` (none, auto or a path) asks for, if any."""
    how = cfg.checkpoint.resume
    if how == "none":
        return None
    if how == "auto":
        return ckpt.latest_checkpoint(checkpoint_root(cfg))
    return ckpt.resolve_checkpoint(how)


def build_shared(cfg, parts: Components, progress: Progress) -> dict:
    """The contents of ``trainer.pt`` (rank 0)."""
    num_classes, world_size = parts.head.num_classes, parts.head.world_size
    return {"format": FORMAT, **progress._asdict(), "config": to_yaml(cfg), "num_classes": num_classes,
            "world_size": world_size,
            "model": {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                      "options": OmegaConf.to_container(cfg.model.options)},
            "head_shards": [shard_range(num_classes, world_size, r) for r in range(world_size)],
            "backbone": parts.engine.state_dict(), "head_schedule": parts.head_schedule.state_dict(),
            "head_param_groups": parts.head_optimizer.state_dict()["param_groups"],
            "scaler": parts.scaler.state_dict(), "data": parts.loader.state_dict()}


def build_rank_state(parts: Components) -> dict:
    """The contents of this rank's ``head_rank*.pt``."""
    head = parts.head
    rows = {k: v.detach().cpu() for k, v in parts.head_optimizer.state.get(head.weight, {}).items()
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == head.num_local}
    return {"head": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in head.state_dict().items()},
            "optimizer_rows": rows, "rng": capture_rng(), "data": parts.loader.state_dict()}


def check_compatible(cfg, num_classes: int, shared: dict, path: str) -> None:
    """Raise :class:`CheckpointError` unless ``shared`` is of this format, model and class count."""
    if shared.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {shared.get('format')}, this version resumes "
                              f"format {FORMAT} only")
    mine = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size, "num_classes": num_classes}
    theirs = {**shared["model"], "num_classes": shared["num_classes"]}
    theirs.pop("options", None)
    if mine != theirs:
        raise CheckpointError(f"checkpoint {path} was written for {theirs}, this run is {mine}; "
                                   "to fine-tune on other classes set checkpoint.init_backbone instead")


def restore(path: str, cfg, parts: Components) -> Progress:
    """Load the checkpoint at ``path`` into ``parts``; reshards the head if the world size changed."""
    shared = ckpt.load_shared(path)
    check_compatible(cfg, parts.head.num_classes, shared, path)
    try:
        parts.engine.load_state_dict(shared["backbone"], path)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot load the backbone from {path}: {str(err).splitlines()[0]}") from None
    parts.head_schedule.load_state_dict(shared["head_schedule"])
    if shared["scaler"] and parts.scaler.is_enabled():  # a bf16/fp32 run saved no scaler state
        parts.scaler.load_state_dict(shared["scaler"])
    progress = Progress(shared["step"], shared["skipped_steps"], shared["run_id"])
    head = parts.head
    if shared["world_size"] == head.world_size:
        mine = ckpt.load_rank_file(path, head.rank)
        head.load_state_dict(mine["head"])
        rows = mine["optimizer_rows"]
        restore_rng(mine["rng"])
        parts.loader.load_state_dict(mine["data"])
    else:
        gathered = ckpt.gather_head_rows(path, shared["head_shards"], head.class_start, head.num_local)
        with torch.no_grad():
            head.weight.copy_(gathered["weight"])
        rows = gathered["optimizer"]
        head.sampler.reseed(progress.step)
        seed_rank_stream(cfg.seed, head.rank, progress.step)
        parts.loader.load_state_dict(shared["data"])
    if rows:
        device = head.weight.device
        parts.head_optimizer.load_state_dict({"state": {0: {k: v.to(device) for k, v in rows.items()}},
                                              "param_groups": shared["head_param_groups"]})
    sync_schedule(parts.head_schedule)
    return progress
