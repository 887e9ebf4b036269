"""NormFace, CosFace, ArcFace (losses.md section 2)."""

from __future__ import annotations

import math

import torch

from partialfc.losses.base import MarginLoss, safe_arccos


class NormFace(MarginLoss):
    """Plain normalised softmax: ``psi(c) = c``."""


class CosFace(MarginLoss):
    """Additive cosine margin: ``psi(c) = c - m`` (paper: s=64, m=0.35; large scale: 0.4)."""

    def __init__(self, s: float = 64.0, m: float = 0.4, **kwargs):
        super().__init__(s=s, **kwargs)
        self.m = float(m)

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m

    def extra_repr(self) -> str:
        return f"m={self.m}, " + super().extra_repr()


class ArcFace(MarginLoss):
    """Additive angular margin: ``psi(c) = cos(theta + m)``; past ``theta + m > pi`` the
    monotone fallback ``c - m*sin(m)``; ``easy_margin`` keeps ``c`` where ``c <= 0``.

    Default gradient: exact (the setting of the paper's published numbers)."""

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, **kwargs):
        super().__init__(s=s, **kwargs)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"ArcFace margin m must lie in [0, pi), got {m}")
        self.m = float(m)
        self.easy_margin = easy_margin

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        margin = torch.cos(safe_arccos(cos_target) + self.m)
        if self.easy_margin:
            return torch.where(cos_target > 0, margin, cos_target)
        fallback = cos_target - self.m * math.sin(self.m)
        return torch.where(cos_target > math.cos(math.pi - self.m), margin, fallback)

    def extra_repr(self) -> str:
        return f"m={self.m}, easy_margin={self.easy_margin}, " + super().extra_repr()
