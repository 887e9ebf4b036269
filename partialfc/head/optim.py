"""Optimizers that touch only the rows a step sampled.

With ``sample_rate < 1`` the head's ``weight.grad`` is a sparse COO tensor whose indices are
the sampled rows. These optimizers update exactly those rows: parameter, momentum / Adam
moments and weight decay of every other row stay bit-identical, and no dense gradient of
the shard is ever formed. A dense gradient (``sample_rate == 1``) updates every row and then
matches ``torch.optim.SGD`` / ``torch.optim.AdamW`` step for step.
"""

from __future__ import annotations

import torch


def _rows_and_values(param: torch.Tensor, grad: torch.Tensor):
    """``(rows, grad_rows)``: sampled row indices (``None`` = all rows) and their gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values().to(param.dtype)
    return None, grad


def _run_closure(closure):
    """The optimizer-closure convention: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _take(t: torch.Tensor, rows):
    return t if rows is None else t.index_select(0, rows)


def _put(t: torch.Tensor, rows, value: torch.Tensor) -> None:
    if rows is None:
        t.copy_(value)
    else:
        t.index_copy_(0, rows, value)


class SparseRowSGD(torch.optim.Optimizer):
    """SGD with momentum, Nesterov and L2 weight decay (``torch.optim.SGD`` semantics,
    dampening 0) applied to the sampled rows only."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, d = _rows_and_values(p, p.grad)
                p_rows = _take(p, rows)
                if wd:
                    d = d.add(p_rows, alpha=wd)
                if mu:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = _take(state["momentum_buffer"], rows).mul_(mu).add_(d)
                    _put(state["momentum_buffer"], rows, buf)
                    d = d.add(buf, alpha=mu) if group["nesterov"] else buf
                _put(p, rows, p_rows.add(d, alpha=-lr))
        return loss


class SparseRowAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, ``torch.optim.AdamW`` semantics) on the sampled rows.

    Each row keeps its own step count, so the bias correction of a row reflects how often
    that row was sampled; at ``sample_rate == 1`` this is the usual global step."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _rows_and_values(p, p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                p_rows = _take(p, rows).mul_(1 - lr * wd)
                m = _take(state["exp_avg"], rows).lerp_(g, 1 - b1)
                v = _take(state["exp_avg_sq"], rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                step = _take(state["step"], rows) + 1
                shape = (-1,) + (1,) * (p.dim() - 1)
                bias1 = (1 - b1 ** step).to(p.dtype).view(shape)
                bias2_sqrt = (1 - b2 ** step).sqrt().to(p.dtype).view(shape)
                p_rows.sub_(lr * m / bias1 / (v.sqrt() / bias2_sqrt + eps))
                for name, value in (("exp_avg", m), ("exp_avg_sq", v), ("step", step)):
                    _put(state[name], rows, value)
                _put(p, rows, p_rows)
        return loss
