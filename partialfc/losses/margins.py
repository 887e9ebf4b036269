"""NormFace, CosFace, the combined angular margin and ArcFace (losses.md section 2)."""

from __future__ import annotations

import math

import torch

from partialfc.losses.base import MarginLoss, safe_arccos
from partialfc.losses.registry import register_loss


@register_loss("normface")
class NormFace(MarginLoss):
    """Plain normalised softmax: ``psi(c) = c``."""


@register_loss("cosface")
class CosFace(MarginLoss):
    """Additive cosine margin: ``psi(c) = c - m`` (paper: s=64, m=0.35; large scale: 0.4)."""

    def __init__(self, s: float = 64.0, m: float = 0.4, **kwargs):
        super().__init__(s=s, **kwargs)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"CosFace margin m must lie in [0, 1), got {m}")
        self.m = float(m)

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m

    def extra_repr(self) -> str:
        return f"m={self.m}, " + super().extra_repr()


def fallback_is_monotone(u: float) -> bool:
    """Whether the linear fallback at ``theta* = pi - u`` keeps ``psi`` decreasing in theta.

    The margin branch ends at ``psi = -1 - m3``; the fallback starts at
    ``-cos(u) - u*sin(u) - m3``, which is not above it iff ``cos(u) + u*sin(u) >= 1``
    (true for ``u`` up to about 2.33 rad)."""
    return math.cos(u) + u * math.sin(u) >= 1.0 - 1e-12


@register_loss("combined")
class CombinedMargin(MarginLoss):
    """Combined margin ``psi(c) = cos(m1*theta + m2) - m3`` with all three applied together.

    Past ``theta* = (pi - m2)/m1`` (when below pi) ``cos(m1*theta + m2)`` would rise again;
    there ``psi`` falls back to ``c - u*sin(u) - m3`` with ``u = pi - theta*``, the
    first-order margin at ``theta*`` (for ArcFace, ``u = m``: the classic ``c - m*sin(m)``).
    ``easy_margin`` keeps ``psi(c) = c`` where ``c <= 0``. Good settings: (1, 0.3, 0.2),
    (0.9, 0.4, 0.15). Default gradient: exact (the MXNet code behind the paper's numbers).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                 easy_margin: bool = False, **kwargs):
        super().__init__(s=s, **kwargs)
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"m2 must lie in [0, pi), got {m2}")
        if m3 < 0:
            raise ValueError(f"m3 must be >= 0, got {m3}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.easy_margin = bool(easy_margin)
        theta_star = (math.pi - self.m2) / self.m1
        u = max(math.pi - theta_star, 0.0)
        if not fallback_is_monotone(u):
            raise ValueError(f"m1={m1}, m2={m2} reach m1*theta + m2 = pi at theta = {theta_star:.3f} "
                             "rad; psi cannot be kept monotone there (need theta* >= ~0.81 rad)")
        self.cos_threshold = math.cos(theta_star) if theta_star < math.pi else -math.inf
        self.fallback_shift = u * math.sin(u) + self.m3

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        margin = torch.cos(self.m1 * safe_arccos(cos_target) + self.m2) - self.m3
        psi = torch.where(cos_target > self.cos_threshold, margin, cos_target - self.fallback_shift)
        return torch.where(cos_target > 0, psi, cos_target) if self.easy_margin else psi

    def extra_repr(self) -> str:
        return (f"m1={self.m1}, m2={self.m2}, m3={self.m3}, easy_margin={self.easy_margin}, "
                + super().extra_repr())


@register_loss("arcface")
class ArcFace(CombinedMargin):
    """Additive angular margin: ``psi(c) = cos(theta + m)`` (paper: s=64, m=0.5); past
    ``theta + m > pi`` the monotone fallback ``c - m*sin(m)``; ``easy_margin`` keeps ``c``
    where ``c <= 0``. Default gradient: exact (the setting of the paper's published numbers).
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, **kwargs):
        if not 0.0 <= m < math.pi:
            raise ValueError(f"ArcFace margin m must lie in [0, pi), got {m}")
        super().__init__(s=s, m1=1.0, m2=m, m3=0.0, easy_margin=easy_margin, **kwargs)

    @property
    def m(self) -> float:
        return self.m2
