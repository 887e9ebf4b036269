"""The seconds-long training run shared by the training, checkpoint and preemption tests, and
what a test watching such a run from outside reads of it."""

from __future__ import annotations

import json
import os


def tiny_overrides(run_dir, cache_dir, *extra) -> list[str]:
    """A run of a few seconds: 16 synthetic identities, a few-channel IResNet at 56 px."""
    return [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}",
            "data.synthetic.num_identities=32", "data.synthetic.images_per_identity=8",
            "data.synthetic.verification_identities=32", "data.synthetic.verification_pairs=400",
            "data.batch_size=16", "data.num_workers=0", "model.backbone=iresnet_tiny", "model.embedding_size=32",
            "loss.name=cosface", "loss.params={s: 16.0, m: 0.2}",
            "head.sample_rate=0.5", "optim.lr=0.2", "head.optimizer.lr=0.2", "optim.schedule.warmup_steps=2",
            "head.optimizer.schedule.warmup_steps=2", "train.max_steps=8", "log.every_steps=1",
            "log.wandb.mode=disabled", "log.plot=false", "eval.every_steps=0", "eval.batch_size=64",
            "checkpoint.every_steps=0", *extra]


def logged_train_steps(run_dir) -> list[int]:
    """The steps of the train records in ``run_dir/metrics.jsonl`` so far ([] before the file
    exists), for a test polling a run that is still appending to it: a last line without its
    newline is a record being written, left for the next look rather than read as JSON."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [line for line in f if line.endswith("\n") and line.strip()]
    except FileNotFoundError:
        return []
    return [record["step"] for record in map(json.loads, lines) if record["kind"] == "train"]
