"""Optimizers and learning-rate schedules, counted in optimizer steps (not micro-steps).

The backbone gets a ``torch.optim`` optimizer; the sharded head its own sparse-row one
(only the sampled rows are touched). Each has its own schedule with warm-up.
"""

from __future__ import annotations

import math

import torch

from partialfc.head import SparseRowAdamW, SparseRowSGD
from partialfc.train.config_schema import OptimizerConfig, ScheduleConfig


class WarmupSchedule:
    """LR factor at optimizer step ``t`` of ``total_steps``: linear warm-up ``(t+1)/warmup``
    over the first ``warmup`` steps, then the decay ``name`` over the rest."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int):
        self.name, self.total = cfg.name, max(int(total_steps), 1)
        self.warmup = int(cfg.warmup_steps or round(cfg.warmup_fraction * self.total))
        self.power, self.min_factor, self.gamma = cfg.power, cfg.min_factor, cfg.gamma
        self.milestones = [int(m * self.total) for m in cfg.milestones]

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        if self.name == "poly":
            return self.min_factor + (1 - self.min_factor) * (1 - t) ** self.power
        if self.name == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.name == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def build_optimizer(params, cfg: OptimizerConfig, sparse_rows: bool = False) -> torch.optim.Optimizer:
    """``cfg``: an :class:`~partialfc.train.config.OptimizerConfig`. ``sparse_rows`` picks
    the head's row optimizers (SparseRowSGD / SparseRowAdamW)."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        klass = SparseRowSGD if sparse_rows else torch.optim.SGD
        return klass(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    klass = SparseRowAdamW if sparse_rows else torch.optim.AdamW
    return klass(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :class:`WarmupSchedule`; call ``.step()`` once per optimizer step.

    The factor is wrapped in a plain function so that ``state_dict`` keeps only the step
    count: a resumed run follows the schedule of its own config (e.g. more steps), not the
    horizon of the run that wrote the checkpoint."""
    factor = WarmupSchedule(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))


def sync_schedule(schedule: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After loading a checkpoint: set each group's lr to the schedule's value at its step."""
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)


def grad_norm(params) -> torch.Tensor:
    """L2 norm (float32 scalar) over the gradients of ``params``; sparse gradients (the
    head at rate < 1) count their coalesced values only, i.e. the sampled rows."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        norms.append(torch.linalg.vector_norm(g.float()))
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip_grads_(params, max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients in place so that their total norm ``norm`` (a tensor on their device) is
    at most ``max_norm``, without a host read: every gradient is multiplied by the fp32 factor
    ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does. Sparse
    gradients keep their dtype and their coalesced mark, their values scaled in fp32. No-op
    when ``max_norm <= 0``; the caller skips non-finite steps."""
    if max_norm <= 0:
        return
    factor = torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            values = (g._values().float() * factor.to(g.device)).to(g.dtype)
            p.grad = torch.sparse_coo_tensor(g._indices(), values, g.shape, is_coalesced=g.is_coalesced(),
                                             check_invariants=False)
        else:
            g.mul_(factor.to(g.device))
