"""X2-Softmax (arXiv 2312.05281; losses.md section 3): a quadratic target logit in the angle."""

from __future__ import annotations

import torch

from partialfc.losses.base import MarginLoss, safe_arccos
from partialfc.losses.registry import register_loss


@register_loss("x2softmax")
class X2Softmax(MarginLoss):
    """``psi(c) = a*(theta - h)**2 + k`` with ``theta = arccos(c)``; target logit ``s*psi``.

    Defaults are the authors' released run: s=64, a=-0.9, h=0, k=0.65. ``a < 0`` and
    ``h <= 0`` keep ``psi`` decreasing on ``[0, pi]``. Default gradient: exact
    (``s*psi'(c)``, which grows like ``1/sin(theta)`` toward theta = pi), chosen from the
    evidence in docs/losses.md (level with CosFace only with it on a real-face check);
    ``gradient="straight_through"`` reproduces the released code behind the published
    numbers (which, unlike here, did not clamp before arccos). The logit-space penalty ``c - psi`` grows with the
    angle, so the two-class decision margin widens with the angle between class centres
    above ~90 degrees (the paper's "margin adaptive" property).
    """

    default_gradient = "exact"

    def __init__(self, s: float = 64.0, a: float = -0.9, h: float = 0.0, k: float = 0.65, **kwargs):
        super().__init__(s=s, **kwargs)
        if not a < 0:
            raise ValueError(f"X2-Softmax needs a < 0 (psi must decrease in theta), got a={a}")
        if not h <= 0:
            raise ValueError(f"X2-Softmax needs h <= 0 (psi must decrease on [0, pi]), got h={h}")
        self.a, self.h, self.k = float(a), float(h), float(k)

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        return self.a * (safe_arccos(cos_target) - self.h) ** 2 + self.k

    def extra_repr(self) -> str:
        return f"a={self.a}, h={self.h}, k={self.k}, " + super().extra_repr()
