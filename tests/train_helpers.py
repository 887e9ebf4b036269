"""The seconds-long training run shared by the training, checkpoint and preemption tests."""

from __future__ import annotations


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
