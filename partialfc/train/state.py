"""What a training checkpoint holds (format 3), when one is written, and how a run comes
back from one (format 3, or format 2 of earlier versions).

:mod:`partialfc.train.checkpoint` writes the files atomically; :class:`Checkpointer` fills
them from a :class:`~partialfc.train.train_state.TrainState`, whose components it does not
look into. Each file holds only tensors and plain Python values (``weights_only`` loading).

``trainer.pt`` (rank 0): ``{"format": 3, "meta": {config (YAML text), num_classes,
world_size, model (backbone, embedding_size, options), row_shards (``(class_start,
num_local)`` of every rank)}, "state": the shared components' states}``.

``head_rank*.pt`` (every rank): ``{"local": the local components' states, "rows": the row
components' tensors, ``{component: {name: (num_local, ...)}}``}``.

On the same world size every rank gets its own file back (a bitwise-exact resume). On
another one the rows are gathered from the saved shards that overlap the new ones and the
local components restart at the saved step (:meth:`TrainState.restart_local`).

In a search each candidate checkpoints into its own root (:func:`checkpoint_root`), with its
group ranks as ranks; candidate 0's is the run's ``checkpoints`` directory.
"""

from __future__ import annotations

import os
from typing import Callable

from omegaconf import OmegaConf

from partialfc.errors import CheckpointError, ConfigError
from partialfc.train import checkpoint as ckpt
from partialfc.train.config_schema import Config
from partialfc.train.train_state import TrainState

FORMAT = 3
READS = (2, 3)  # the formats this version resumes


def checkpoint_root(cfg: Config, candidate: int = 0) -> str:
    """``RUN_DIR/checkpoints``; a search's candidate ``c > 0``: ``checkpoints/candidates/c``."""
    root = os.path.join(cfg.run_dir, "checkpoints")
    return root if candidate == 0 else os.path.join(root, "candidates", str(candidate))


def resume_path(cfg: Config, candidate: int = 0) -> str | None:
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


# ----------------------------------------------------------------- reading either format
def _format2_shared(saved: dict) -> dict:
    """A format-2 ``trainer.pt`` as format 3 (its head optimizer saved no counters)."""
    meta = {k: saved[k] for k in ("config", "num_classes", "world_size", "model") if k in saved}
    state = {"progress": {k: saved[k] for k in ("step", "skipped_steps", "run_id")}, "engine": saved["backbone"],
             "head_optimizer": {"state": {}, "param_groups": saved["head_param_groups"]},
             "head_schedule": saved["head_schedule"], "scaler": saved["scaler"], "data": saved["data"],
             "search": saved.get("search")}
    return {"format": 2, "meta": {**meta, "row_shards": saved["head_shards"]}, "state": state}


def _format2_rank(saved: dict) -> dict:
    head = dict(saved["head"])
    weight = head.pop("weight")
    return {"local": {"head": head["_extra_state"], "rng": saved["rng"], "data": saved["data"]},
            "rows": {"head": {"weight": weight}, "head_optimizer": saved["optimizer_rows"]}}


def read_shared(path: str) -> dict:
    """``trainer.pt`` of checkpoint ``path`` in format 3's layout (a format-2 one converted);
    :class:`CheckpointError` for another format."""
    saved = ckpt.load_shared(path)
    found = saved.get("format")
    if found not in READS:
        raise CheckpointError(f"checkpoint {path} has format {found}, this version resumes formats "
                              f"{' and '.join(map(str, READS))}")
    return _format2_shared(saved) if found == 2 else saved


def read_rank(path: str, rank: int, fmt: int) -> dict:
    saved = ckpt.load_rank_file(path, rank)
    return _format2_rank(saved) if fmt == 2 else saved


def gather_rows(path: str, shared: dict, start: int, count: int) -> dict:
    """Rows ``[start, start + count)`` of every row component, from the shards of ``path``."""
    return ckpt.gather_rows(lambda r: read_rank(path, r, shared["format"])["rows"], shared["meta"]["row_shards"],
                            start, count)


# ----------------------------------------------------------------- compatibility
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


def objective_changes(cfg: Config, saved_yaml: str) -> list[str]:
    """``"key: saved -> now"`` for each leaf under :data:`OBJECTIVE_KEYS` that differs between
    the checkpoint's config (its YAML text) and ``cfg``."""
    saved, changes = OmegaConf.create(saved_yaml), []
    for key in OBJECTIVE_KEYS:
        old, new = _leaves(OmegaConf.select(saved, key), key), _leaves(OmegaConf.select(cfg, key), key)
        changes += [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                    for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return changes


def check_compatible(cfg: Config, num_classes: int, meta: dict, path: str) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's ``meta`` is of this model and
    class count and (unless ``checkpoint.allow_config_change``) has the same :data:`OBJECTIVE_KEYS`."""
    mine = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size, "num_classes": num_classes}
    theirs = {**meta["model"], "num_classes": meta["num_classes"]}
    theirs.pop("options", None)
    if mine != theirs:
        raise CheckpointError(f"checkpoint {path} was written for {theirs}, this run is {mine}; "
                              "to fine-tune on other classes set checkpoint.init_backbone instead")
    changes = objective_changes(cfg, meta["config"]) if "config" in meta else []
    if changes and not cfg.checkpoint.allow_config_change:
        raise CheckpointError(f"checkpoint {path} was trained with another model or objective ("
                              f"{'; '.join(changes)}); use another run_dir, or set "
                              "checkpoint.allow_config_change=true to continue from it anyway")


# ----------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Writes ``state``'s checkpoints under ``root`` (this rank is ``rank`` of ``world_size``
    ranks, owning classes ``[class_start, class_start + num_local)``) and restores them.
    ``meta()``: the run's description for ``trainer.pt``; ``files``: an object with
    ``save_files(dir)`` / ``load_files(dir)`` for state kept as files of its own (the
    DeepSpeed engine's), or None. Decides its timing: :meth:`due`."""

    def __init__(self, cfg: Config, root: str, state: TrainState, meta: Callable[[], dict], *, rank: int,
                 world_size: int, shard: tuple[int, int], files=None):
        self.cfg, self.root, self.state, self.meta, self.files = cfg, root, state, meta, files
        self.rank, self.world_size, self.shard = rank, world_size, shard
        self.every, self.keep = int(cfg.checkpoint.every_steps), int(cfg.checkpoint.keep)
        self.saved_step: int | None = None

    def due(self, step: int, requested: bool = False) -> bool:
        """After step ``step``: every ``checkpoint.every_steps`` and when asked."""
        return requested or (self.every > 0 and step % self.every == 0)

    def save(self, step: int) -> str:
        """Collective over the candidate's ranks: a complete checkpoint of ``step``; its path."""
        shared = {"format": FORMAT, "meta": self.meta(), "state": self.state.shared_state()} if self.rank == 0 else None
        rank_state = {"local": self.state.local_state(), "rows": self.state.row_state()}
        path = ckpt.save_checkpoint(self.root, step, shared, rank_state, keep=self.keep,
                                    write_extra=self.files.save_files if self.files is not None else None,
                                    rank=self.rank)
        self.saved_step = step
        return path

    def restore(self, path: str, num_classes: int) -> None:
        """Load checkpoint ``path`` into the state; reshards if the world size changed."""
        shared = read_shared(path)
        check_compatible(self.cfg, num_classes, shared["meta"], path)
        state = shared["state"]
        if self.state.shared.get("search") is not None and state.get("search") is None:
            raise CheckpointError(f"checkpoint {path} holds no search state; a search resumes only from a search")
        try:
            self.state.load_shared(state)
            if self.files is not None:
                self.files.load_files(path)
        except (CheckpointError, RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load the training state from {path}: {str(err).splitlines()[0]}") from None
        if shared["meta"]["world_size"] == self.world_size:
            mine = read_rank(path, self.rank, shared["format"])
            self.state.load_local(mine["local"])
            self.state.load_rows(mine["rows"])
        else:
            self.state.load_rows(gather_rows(path, shared, *self.shard))
            self.state.restart_local(int(state["progress"]["step"]), state)
        self.saved_step = int(state["progress"]["step"])
