"""Independent float64 oracles, written from the formulas of docs/losses.md.

Plain torch math on dense tensors (one-hot masks, ``logsumexp``, ``log1p``, autograd): this
module never imports ``partialfc``, so a bug in the library cannot hide in its own
reference. :data:`SPECS` pairs every registered loss (by registry name and constructor
parameters, plain data) with its reference; tests build the library side with
``spec.build(build_loss)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

CLAMP = 1 - 1e-7  # exact-gradient modes clamp before arccos (losses.md section 1)
DEFAULT_S = 64.0  # the papers' scale, every loss's default


def theta_of(c: torch.Tensor) -> torch.Tensor:
    return torch.arccos(c.clamp(-CLAMP, CLAMP))


def combined_psi(c, m1, m2, m3, easy=False):
    """``cos(m1*theta + m2) - m3``; past ``theta* = (pi - m2)/m1`` the monotone fallback
    ``c - u*sin(u) - m3``, ``u = pi - theta*``; ``easy``: the plain cosine where ``c <= 0``."""
    theta = theta_of(c)
    theta_star = (math.pi - m2) / m1
    u = max(math.pi - theta_star, 0.0)
    psi = torch.where(theta <= theta_star, torch.cos(m1 * theta + m2) - m3, c - u * math.sin(u) - m3)
    return torch.where(c > 0, psi, c) if easy else psi


def search_psi(a: float, s: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Search/Random-Softmax with a constant ``a <= 0``: CosFace with ``m = ln(1 - a)/s``."""
    return lambda c: c - math.log(1.0 - a) / s


def softmax_cross_entropy_rows(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``LSE_j(z_j) - z_y`` per row; ``z (B, n)``, ``target (B,)`` column indices."""
    onehot = F.one_hot(target, z.shape[1]).bool()
    return torch.logsumexp(z, dim=1) - z[onehot]


def dissected_rows(z: torch.Tensor, target: torch.Tensor, intra_logit: float, inter_scale: float = 1.0):
    """D-Softmax objective per row: ``log(1 + exp(t - z_y)) + log(1 + r * sum_{j != y} exp(z_j))``."""
    onehot = F.one_hot(target, z.shape[1]).bool()
    others = torch.where(onehot, 0.0, torch.exp(z)).sum(dim=1)
    return torch.log1p(torch.exp(intra_logit - z[onehot])) + torch.log1p(inter_scale * others)


def margin_softmax_rows(cos, labels, s, psi, threshold=None, straight_through=False):
    """Per-row margin-softmax loss: ``z_y = s*psi(c_y)``, ``z_j = s*c_j``, ``LSE(z) - z_y``.

    ``threshold``: inter-class filtering (non-target cosines above it become 0);
    ``straight_through``: the forward of ``psi``, the backward of ``s*c``."""
    cos = cos.double()
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    if threshold is not None:
        cos = torch.where(onehot | (cos <= threshold), cos, torch.zeros_like(cos))
    target = s * psi(cos)
    if straight_through:
        target = s * cos + (target - s * cos).detach()
    return softmax_cross_entropy_rows(torch.where(onehot, target, s * cos), labels)


def dsoftmax_rows(cos, labels, s, d, scale=1.0):
    """Per-row D-Softmax: ``log1p(exp(s*(d - c_y))) + log1p(scale * sum_{k != y} exp(s*c_k))``."""
    return dissected_rows(s * cos.double(), labels, s * d, scale)


@dataclass(frozen=True)
class Spec:
    """A registered loss with fixed parameters and its reference.

    ``loss``: the registry name; ``params``: constructor parameters (``s`` defaults to
    :data:`DEFAULT_S`); ``psi``: the target transform of a margin softmax (unused for
    ``dsoftmax``, whose ``params`` hold ``d``, ``K``, ``rescale_inter``; for
    ``random_softmax`` it follows from the drawn ``a``); ``epoch``: the library loss first
    draws its parameter with ``set_epoch(epoch)``."""

    loss: str
    params: dict = field(default_factory=dict)
    psi: Callable[[torch.Tensor], torch.Tensor] | None = None
    epoch: int | None = None

    @property
    def s(self) -> float:
        return self.params.get("s", DEFAULT_S)

    def with_scale(self, s: float) -> Spec:
        """This spec at scale ``s`` (``psi`` does not depend on it)."""
        return replace(self, params={**self.params, "s": s})

    def build(self, build_loss, **overrides):
        """The library's loss for this spec, from the registry's ``build_loss`` (passed in:
        this module does not import the library); ``overrides`` add constructor parameters."""
        loss = build_loss(self.loss, **{**self.params, **overrides})
        if self.epoch is not None:
            loss.set_epoch(self.epoch)
        return loss

    def rows(self, cos, labels, threshold=None, straight_through=False, a=None):
        """Per-row float64 losses on cosines ``cos (B, n)`` with target columns ``labels (B,)``;
        ``a``: the drawn ``a`` of a ``random_softmax``."""
        if self.loss == "dsoftmax":
            scale = self.params["K"] if self.params.get("rescale_inter") else 1.0
            return dsoftmax_rows(cos, labels, self.s, self.params["d"], scale=scale)
        psi = search_psi(a, self.s) if self.loss == "random_softmax" else self.psi
        return margin_softmax_rows(cos, labels, self.s, psi, threshold=threshold, straight_through=straight_through)


def _arcface_psi(m):
    return lambda c: torch.where(theta_of(c) + m <= math.pi, torch.cos(theta_of(c) + m), c - m * math.sin(m))


SPECS = {
    "normface": Spec("normface", dict(s=32.0), lambda c: c),
    "cosface": Spec("cosface", dict(s=32.0, m=0.35), lambda c: c - 0.35),
    "arcface": Spec("arcface", dict(s=64.0, m=0.5), _arcface_psi(0.5)),
    "arcface_easy": Spec("arcface", dict(s=64.0, m=0.5, easy_margin=True),
                         lambda c: torch.where(c > 0, torch.cos(theta_of(c) + 0.5), c)),
    "combined_1": Spec("combined", dict(s=64.0, m1=1.0, m2=0.3, m3=0.2), lambda c: combined_psi(c, 1.0, 0.3, 0.2)),
    "combined_2": Spec("combined", dict(s=64.0, m1=0.9, m2=0.4, m3=0.15), lambda c: combined_psi(c, 0.9, 0.4, 0.15)),
    "combined_3": Spec("combined", dict(s=32.0, m1=1.2, m2=0.2, m3=0.1), lambda c: combined_psi(c, 1.2, 0.2, 0.1)),
    "x2": Spec("x2softmax", {}, lambda c: -0.9 * theta_of(c) ** 2 + 0.65),  # the released defaults
    "x2_shifted": Spec("x2softmax", dict(s=30.0, a=-0.5, h=-0.2, k=0.8), lambda c: -0.5 * (theta_of(c) + 0.2) ** 2 + 0.8),
    "search": Spec("search_softmax", dict(s=64.0, a=-30.0), search_psi(-30.0, 64.0)),
    "random": Spec("random_softmax", dict(s=32.0, seed=1), epoch=3),
    "dsoftmax": Spec("dsoftmax", dict(s=16.0, d=0.6)),
    "dsoftmax_B": Spec("dsoftmax", dict(s=16.0, d=0.6, variant="B")),
    "dsoftmax_K": Spec("dsoftmax", dict(s=16.0, d=0.6, variant="K", K=4)),
    "dsoftmax_K_rescaled": Spec("dsoftmax", dict(s=16.0, d=0.6, variant="K", K=4, rescale_inter=True)),
}
ANGULAR = ["arcface", "arcface_easy", "combined_1", "combined_2", "combined_3", "x2", "x2_shifted"]


def make_problem(world_size, local_batches, num_classes, dim, seed, target_at_one=False):
    """A float64 head problem split over ``world_size`` ranks.

    Returns ``batches`` (the first ``world_size`` of ``local_batches``), the global batch
    ``x (B, dim)``, labels ``y (B,)`` with ``y[0]`` the last class (owned by the last rank)
    and centres ``w (num_classes, dim)``; ``target_at_one``: row 1's centre is parallel to
    ``x[1]`` (a target cosine of exactly 1)."""
    gen = torch.Generator().manual_seed(seed)
    batches = local_batches[:world_size]
    x = torch.randn(sum(batches), dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (sum(batches),), generator=gen)
    y[0] = num_classes - 1
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    if target_at_one:
        w[y[1]] = x[1] * 3.0
    return batches, x, y, w


def head_reference(rows, x, y, w, classes=None):
    """The whole head in one process: mean of ``rows(cos, labels)`` over the global batch on
    the centres ``classes`` (sorted global ids holding every label; ``None``: all).

    ``cos = clamp(normalize(x) @ normalize(w).T, -1, 1)``. Returns the loss (a float) and
    its gradients with respect to ``x (B, dim)`` and ``w (C, dim)``."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    classes = torch.arange(w.shape[0]) if classes is None else torch.as_tensor(classes)
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1, 1)[:, classes]
    labels = torch.searchsorted(classes, y)
    assert (classes[labels] == y).all()
    loss = rows(cos, labels).mean()
    loss.backward()
    return loss.item(), x.grad, w.grad
