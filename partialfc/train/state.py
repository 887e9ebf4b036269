"""What a training checkpoint holds, and how a run comes back from one.

:mod:`partialfc.train.checkpoint` writes the files atomically; this module decides their
contents (format 2). Each holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.

``trainer.pt`` (rank 0, :func:`build_shared`): format, step, skipped_steps, run_id, config
(YAML text), num_classes, world_size, model (backbone, embedding_size, options),
head_shards (``(class_start, num_local)`` of every rank), backbone (the engine's state),
head_schedule, head_param_groups, scaler, data (rank 0's loader position), search (the
Search-Softmax state: mu, its Adam state, the history and schedule of ``a``; None without a
search).

``head_rank*.pt`` (every rank, :func:`build_rank_state`): head (``head.state_dict()``: the
shard's rows, its class range and the sampler), optimizer_rows (the head optimizer's per-row
tensors), rng (torch, numpy, python and CUDA generators), data (the loader's position).

:func:`restore` on the same world size gives every rank its own file back (a bitwise-exact
resume). On another world size the head rows and their optimizer rows are gathered from the
saved shards that overlap the new ones, the sampler and torch's generators restart on their
``(seed, rank, step)`` streams, and the loader converts rank 0's position.

In a search each candidate checkpoints into its own root (:func:`checkpoint_root`), with its
group ranks as ranks; candidate 0's is the run's ``checkpoints`` directory. :func:`live_state`
and :func:`apply_state` carry a candidate's complete state in memory (the search's copy of
the best candidate).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from partialfc.errors import CheckpointError, ConfigError
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
    search: object | None = None  # partialfc.train.search.SearchDriver, in a search


class Progress(NamedTuple):
    step: int
    skipped_steps: int
    run_id: str


def seed_rank_stream(seed: int, rank: int, step: int) -> None:
    """Seed the global generators of torch (dropout, ...), numpy and Python with this rank's
    stream at ``step``."""
    value = derive_seed(seed, Stream.RANK, rank, step)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


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


def checkpoint_root(cfg, candidate: int = 0) -> str:
    """``RUN_DIR/checkpoints``; a search's candidate ``c > 0``: ``checkpoints/candidates/c``."""
    root = os.path.join(cfg.run_dir, "checkpoints")
    return root if candidate == 0 else os.path.join(root, "candidates", str(candidate))


def resume_path(cfg, candidate: int = 0) -> str | None:
    """The checkpoint that ``checkpoint.resume`` (none, auto or a path) asks for, if any.
    ``none`` on a run directory that holds checkpoints is a :class:`ConfigError` unless
    ``checkpoint.overwrite`` (the new run replaces its metrics and, in time, its checkpoints)."""
    how = cfg.checkpoint.resume
    if how == "none":  # any checkpoint, whole or damaged, would be replaced
        found = ckpt.list_checkpoints(checkpoint_root(cfg, candidate))
        if found and not cfg.checkpoint.overwrite:
            raise ConfigError(f"checkpoint.resume=none but {cfg.run_dir} holds checkpoints ({found[-1]}); "
                              "use another run_dir, resume (checkpoint.resume=auto) or start over there "
                              "with checkpoint.overwrite=true")
        return None
    if how == "auto":
        return ckpt.latest_checkpoint(checkpoint_root(cfg, candidate))
    return ckpt.resolve_checkpoint(how)


def build_shared(cfg, parts: Components, progress: Progress) -> dict:
    """The contents of ``trainer.pt`` (rank 0)."""
    num_classes, world_size = parts.head.num_classes, parts.head.world_size
    return {"format": FORMAT, **progress._asdict(), "config": to_yaml(cfg), "num_classes": num_classes,
            "world_size": world_size,
            "model": {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                      "options": OmegaConf.to_container(cfg.model.options)},
            "head_shards": [shard_range(num_classes, world_size, r) for r in range(world_size)],
            **_common_state(parts), "data": parts.loader.state_dict(),
            "search": parts.search.state_dict() if parts.search is not None else None}


def _common_state(parts: Components) -> dict:
    return {"backbone": parts.engine.state_dict(), "head_schedule": parts.head_schedule.state_dict(),
            "head_param_groups": parts.head_optimizer.state_dict()["param_groups"],
            "scaler": parts.scaler.state_dict()}


def live_state(parts: Components) -> dict:
    """This rank's complete training state in memory: ``trainer.pt``'s backbone, schedules,
    scaler and head param groups with this rank's ``head_rank*.pt`` contents."""
    return {**_common_state(parts), **build_rank_state(parts)}


def apply_state(state: dict, parts: Components, source: str) -> None:
    """Load a :func:`live_state` (or a checkpoint's shared file merged with one rank's file)
    of the same world size into ``parts``."""
    _load_common(state, parts, source)
    parts.head.load_state_dict(state["head"])
    restore_rng(state["rng"])
    parts.loader.load_state_dict(state["data"])
    _load_optimizer_rows(state["optimizer_rows"], state["head_param_groups"], parts)


def _load_common(state: dict, parts: Components, source: str) -> None:
    try:
        parts.engine.load_state_dict(state["backbone"], source)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot load the backbone from {source}: {str(err).splitlines()[0]}") from None
    parts.head_schedule.load_state_dict(state["head_schedule"])
    if state["scaler"] and parts.scaler.is_enabled():  # a bf16/fp32 run saved no scaler state
        parts.scaler.load_state_dict(state["scaler"])


def _load_optimizer_rows(rows: dict, param_groups: list, parts: Components) -> None:
    if rows:
        device = parts.head.weight.device
        parts.head_optimizer.load_state_dict({"state": {0: {k: v.to(device) for k, v in rows.items()}},
                                              "param_groups": param_groups})
    sync_schedule(parts.head_schedule)


def build_rank_state(parts: Components) -> dict:
    """The contents of this rank's ``head_rank*.pt``."""
    head = parts.head
    rows = {k: v.detach().cpu() for k, v in parts.head_optimizer.state.get(head.weight, {}).items()
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == head.num_local}
    return {"head": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in head.state_dict().items()},
            "optimizer_rows": rows, "rng": capture_rng(), "data": parts.loader.state_dict()}


# What else defines the model and the objective (backbone, embedding size and class count must
# match anyway): a resume with other values would continue another experiment under this run's
# name, so it needs checkpoint.allow_config_change.
OBJECTIVE_KEYS = ("model.options", "loss.name", "loss.params", "head.sample_rate")


def _leaves(node, key: str) -> dict:
    """``{dotted key: value}`` of every leaf of a config node (the node itself if a leaf)."""
    value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _leaves(item, f"{key}.{name}").items()}
    return {key: value}


def objective_changes(cfg, saved_yaml: str) -> list[str]:
    """``"key: saved -> now"`` for each leaf under :data:`OBJECTIVE_KEYS` that differs between
    the checkpoint's config (its YAML text) and ``cfg``."""
    saved, changes = OmegaConf.create(saved_yaml), []
    for key in OBJECTIVE_KEYS:
        old, new = _leaves(OmegaConf.select(saved, key), key), _leaves(OmegaConf.select(cfg, key), key)
        changes += [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                    for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return changes


def check_compatible(cfg, num_classes: int, shared: dict, path: str) -> None:
    """Raise :class:`CheckpointError` unless ``shared`` is of this format, model and class count,
    and (unless ``checkpoint.allow_config_change``) has the same :data:`OBJECTIVE_KEYS`."""
    if shared.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {shared.get('format')}, this version resumes "
                              f"format {FORMAT} only")
    mine = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size, "num_classes": num_classes}
    theirs = {**shared["model"], "num_classes": shared["num_classes"]}
    theirs.pop("options", None)
    if mine != theirs:
        raise CheckpointError(f"checkpoint {path} was written for {theirs}, this run is {mine}; "
                              "to fine-tune on other classes set checkpoint.init_backbone instead")
    changes = objective_changes(cfg, shared["config"]) if "config" in shared else []
    if changes and not cfg.checkpoint.allow_config_change:
        raise CheckpointError(f"checkpoint {path} was trained with another model or objective ("
                              f"{'; '.join(changes)}); use another run_dir, or set "
                              "checkpoint.allow_config_change=true to continue from it anyway")


def restore(path: str, cfg, parts: Components) -> Progress:
    """Load the checkpoint at ``path`` into ``parts``; reshards the head if the world size changed."""
    shared = ckpt.load_shared(path)
    check_compatible(cfg, parts.head.num_classes, shared, path)
    if parts.search is not None:
        if shared.get("search") is None:
            raise CheckpointError(f"checkpoint {path} holds no search state; a search resumes only from a search")
        parts.search.load_state_dict(shared["search"])
    progress = Progress(shared["step"], shared["skipped_steps"], shared["run_id"])
    head = parts.head
    if shared["world_size"] == head.world_size:
        apply_state({**shared, **ckpt.load_rank_file(path, head.rank)}, parts, path)
        return progress
    _load_common(shared, parts, path)
    gathered = ckpt.gather_head_rows(path, shared["head_shards"], head.class_start, head.num_local)
    with torch.no_grad():
        head.weight.copy_(gathered["weight"])
    head.sampler.reseed(progress.step)
    seed_rank_stream(cfg.seed, head.rank, progress.step)
    parts.loader.load_state_dict(shared["data"])
    _load_optimizer_rows(gathered["optimizer"], shared["head_param_groups"], parts)
    return progress
