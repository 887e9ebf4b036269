"""Run output on rank 0: console lines, ``metrics.jsonl``, wandb, and the curves PNG.

Every record is one JSON line ``{"kind": "train" | "eval" | "event", "step": int, ...}``.
wandb runs offline by default (no account, files under ``<run_dir>/wandb``); the run id is
kept in checkpoints so that a resumed job continues the same wandb run.
"""

from __future__ import annotations

import json
import os
import uuid

from partialfc import dist as pdist

METRICS_FILE = "metrics.jsonl"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def truncate_metrics(path: str, after_step: int) -> None:
    """Drop records with ``step > after_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLogger:
    """Rank 0 writes; other ranks' calls are no-ops. ``resume_step`` (None on a fresh run)
    trims records the crashed part of a previous run wrote after its last checkpoint."""

    def __init__(self, run_dir: str, run_id: str, wandb_cfg, config: dict, resume_step: int | None = None):
        self.active = pdist.get_rank() == 0
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.wandb = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            truncate_metrics(self.path, resume_step)
        if wandb_cfg.mode != "disabled":
            self.wandb = self._init_wandb(run_dir, run_id, wandb_cfg, config)

    @staticmethod
    def _init_wandb(run_dir: str, run_id: str, cfg, config: dict):
        import wandb

        wandb_dir = os.path.join(run_dir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ.setdefault(var, wandb_dir)
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, id=run_id, resume="allow",
                          mode=cfg.mode, dir=run_dir, config=config,
                          settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        if self.wandb is not None:
            numeric = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb.log(numeric, step=step)

    def print(self, line: str) -> None:
        if self.active:
            print(line, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plot_curves(metrics_path: str, out_path: str) -> None:
    """PNG with the training loss and the verification accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    for name in sorted({r["set"] for r in evals}):
        points = [r for r in evals if r["set"] == name]
        ax_acc.plot([r["step"] for r in points], [r["accuracy"] for r in points], marker="o", label=name)
    ax_acc.set(xlabel="optimizer step", ylabel="10-fold accuracy", title="verification", ylim=(0.4, 1.0))
    if evals:
        ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
