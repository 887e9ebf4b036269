"""Verification during training: when to evaluate, on which ``.bin`` sets, and the records."""

from __future__ import annotations

import os

import torch

from partialfc.eval.verification import VerificationSet
from partialfc.train.config_schema import EvalConfig
from partialfc.train.logging import RunLogger


class Evaluator:
    """Evaluates ``module`` on every set of ``bins`` (a collective over ``group``: every rank
    takes part) every ``every_steps`` steps before the last (0: never), and logs an ``eval``
    record and a console line per set. :attr:`last_accuracy`: the first set's latest accuracy."""

    def __init__(self, bins: list[str], eval_cfg: EvalConfig, module: torch.nn.Module, logger: RunLogger, *, group,
                 device: torch.device, autocast_dtype: torch.dtype | None):
        self.sets = [VerificationSet(p) for p in bins]
        self.every, self.batch_size = int(eval_cfg.every_steps), int(eval_cfg.batch_size)
        self.module, self.logger, self.group, self.device = module, logger, group, device
        self.autocast_dtype = autocast_dtype
        self.last_accuracy: float | None = None

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def evaluate(self, step: int) -> dict:
        """``{"accuracy": first set's, "accuracy/<set>": ...}`` ({} without sets)."""
        out = {}
        for vs in self.sets:
            result = vs.evaluate(self.module, group=self.group, batch_size=self.batch_size, device=self.device,
                                 autocast_dtype=self.autocast_dtype)
            name = os.path.basename(vs.path)
            self.logger.log("eval", step, {"set": name, **result.as_dict()})
            self.logger.print(f"eval {name} step {step}: accuracy {result.accuracy:.4f} "
                              f"+- {result.accuracy_std:.4f}, TAR@FAR=1e-3 {result.tar_at_far_1e3:.4f}")
            out.setdefault("accuracy", result.accuracy)
            out[f"accuracy/{name}"] = result.accuracy
        if "accuracy" in out:
            self.last_accuracy = out["accuracy"]
        return out
