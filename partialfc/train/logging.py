"""Run output on rank 0: console lines (also in ``training.log``), the resolved
``config.yaml``, ``metrics.jsonl``, wandb, and the curves PNG.

Every record is one JSON line ``{"kind": "train" | "eval" | "event", "step": int, ...}``.
In wandb a record's numbers are ``<kind>/<name>``; an eval record's are
``eval/<set>/<name>`` (``set`` without ``.bin``), so every verification set keeps its own
curve. wandb's mode, project and entity come from ``log.wandb``, else from WANDB_MODE /
WANDB_PROJECT / WANDB_ENTITY, else ``offline`` (no account) / ``partialfc``; the run's files
go under ``<run_dir>/wandb``, the user's wandb settings are left alone, system metrics are
on. The run id is kept in checkpoints so that a resumed job continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Callable

import numpy as np
from omegaconf import OmegaConf

from partialfc import dist as pdist
from partialfc.train.config_schema import WandbConfig

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOG_FILE = "training.log"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _record(line: str) -> dict | None:
    """The record of one ``metrics.jsonl`` line; None for a torn one (a run that died while
    appending it)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def truncate_metrics(path: str, after_step: int) -> None:
    """Drop records with ``step > after_step`` (written after the checkpoint a run resumes
    from) and torn ones."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if (record := _record(line)) is not None and record["step"] <= after_step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wandb_mode(wandb_cfg: WandbConfig) -> str:
    """``log.wandb.mode``, else WANDB_MODE, else ``offline``."""
    return str(wandb_cfg.mode or os.environ.get("WANDB_MODE") or "offline")


def wandb_key(kind: str, metrics: dict, name: str) -> str:
    """The wandb key of ``metrics[name]`` in a record of ``kind``: ``eval/<set>/<name>`` when
    the record names a verification set, else ``<kind>/<name>``."""
    if "set" in metrics:
        return f"{kind}/{os.path.splitext(metrics['set'])[0]}/{name}"
    return f"{kind}/{name}"


class RunLogger:
    """Rank 0 writes; other ranks' calls are no-ops. ``config`` (a mapping) is written to
    ``config.yaml``. ``resume_step`` (None on a fresh run) trims records the crashed part of
    a previous run wrote after its last checkpoint; ``training.log`` is appended to."""

    def __init__(self, run_dir: str, run_id: str, wandb_cfg: WandbConfig, config: dict, resume_step: int | None = None):
        self.active = pdist.get_rank() == 0
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.log_path = os.path.join(run_dir, LOG_FILE)
        self.wandb = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            truncate_metrics(self.path, resume_step)
        with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
            f.write(OmegaConf.to_yaml(config))
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            self.wandb = self._init_wandb(run_dir, run_id, wandb_cfg, mode, config)

    @staticmethod
    def _init_wandb(run_dir: str, run_id: str, cfg: WandbConfig, mode: str, config: dict):
        import wandb

        os.makedirs(os.path.join(run_dir, "wandb"), exist_ok=True)
        return wandb.init(project=cfg.project or os.environ.get("WANDB_PROJECT") or "partialfc",
                          entity=cfg.entity or os.environ.get("WANDB_ENTITY"), name=cfg.name, id=run_id,
                          resume="allow", mode=str(mode), dir=run_dir, config=config,
                          settings=wandb.Settings(silent=True, console="off"))

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        if self.wandb is not None:
            numeric = {wandb_key(kind, metrics, k): v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb.log(numeric, step=step)

    def print(self, line: str) -> None:
        """``line`` on the console and, time-stamped, in ``training.log``."""
        if self.active:
            print(line, flush=True)
            with open(self.log_path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class TrainMetrics:
    """The ``train`` records and their console line: :meth:`update` takes each step's
    metrics and, every ``every`` steps and at ``total_steps``, logs the window since the last
    record (mean finite loss, samples/s, data-wait fraction) with the step's norms, lrs and
    the ETA. ``samples_per_step``: the global batch of one optimizer step."""

    def __init__(self, logger: RunLogger, every: int, samples_per_step: int, total_steps: int, start_step: int = 0):
        self.logger, self.every, self.samples, self.total = logger, max(every, 1), samples_per_step, total_steps
        self.begin(start_step)

    def begin(self, step: int) -> None:
        """Start the clocks (throughput, ETA) at ``step``: when the loop starts."""
        self.start_step, self.start = step, time.perf_counter()
        self._reset(self.start)

    def _reset(self, now: float) -> None:
        self.losses: list[float] = []
        self.wait, self.since = 0.0, now

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def update(self, step: int, metrics: dict, context: Callable[[], dict]) -> None:
        """``metrics``: :meth:`partialfc.train.trainer.Trainer.train_step`'s; ``context()``, called
        only for a record: epoch, lr_backbone, lr_head, skipped_steps (logged as they are)."""
        if metrics["finite"]:
            self.losses.append(metrics["loss"])
        self.wait += metrics["data_wait"]
        if not self.should_log(step):
            return
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        per_step = (now - self.start) / max(step - self.start_step, 1)
        record = {**context(), "loss": float(np.mean(self.losses)) if self.losses else math.nan,
                  "samples_per_s": self.samples * (len(self.losses) or 1) / elapsed,
                  "eta_s": per_step * (self.total - step), "grad_norm_backbone": float(metrics["grad_norm_backbone"]),
                  "grad_norm_head": metrics["grad_norm_head"], "data_wait_fraction": self.wait / elapsed}
        self.logger.log("train", step, record)
        self.logger.print(self.line(step, record))
        self._reset(now)

    def line(self, step: int, r: dict) -> str:
        eta = int(r["eta_s"])
        return (f"step {step}/{self.total} epoch {r['epoch']:.2f} loss {r['loss']:.4f} "
                f"lr {r['lr_backbone']:.4g}/{r['lr_head']:.4g} {r['samples_per_s']:.0f} samples/s "
                f"eta {eta // 60}m{eta % 60:02d}s grad {r['grad_norm_backbone']:.3g}/{r['grad_norm_head']:.3g} "
                f"data {100 * r['data_wait_fraction']:.0f}% skipped {r['skipped_steps']}")


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
