"""Training: typed configs, the trainer loop, optimizers/schedules, checkpoints, logging, export.

Submodules are imported on use (``from partialfc.train.trainer import Trainer``) so that the
config and checkpoint tools do not pull in DeepSpeed or wandb.
"""
