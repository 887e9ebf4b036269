"""D-Softmax (Softmax Dissection, arXiv 1908.01281; losses.md section 5).

``L = softplus(s*(d - c_y)) + log(1 + sum_{k != y} exp(s*c_k))``: the intra term pulls the
target until ``c_y`` passes ``d`` and the inter term pushes the negatives, independently of
the target. The fast variants are the head's sampler, not a separate code path:
``variant="B"`` (negatives = the classes of the global batch) asks the head for sample rate
0, ``variant="K"`` (a random 1/K of the classes, redrawn each step) for rate ``1/K``.
"""

from __future__ import annotations

from partialfc.ops.objectives import RowObjective
from partialfc.losses.base import MarginLoss
from partialfc.losses.registry import register_loss

VARIANTS = ("full", "B", "K")


@register_loss("dsoftmax")
class DSoftmax(MarginLoss):
    """Dissected softmax with intra end point ``d`` (cosine units).

    ``variant``: ``"full"`` (all classes, or whatever rate the head is given), ``"B"``
    or ``"K"`` (sets :attr:`sample_rate`, which ``PartialFC(sample_rate=None)`` adopts).
    ``rescale_inter`` (variant K only) multiplies the sampled inter sum by ``K``, i.e.
    shifts the inter end point by ``ln(K)/s``. Default ``False``: like Partial FC, no
    importance correction; the head keeps every positive of the batch plus uniform
    negatives, so the sample is not uniform and ``K`` times its sum over-counts the
    positives anyway. ``d=0.9`` is the value of public re-implementations.
    """

    def __init__(self, s: float = 64.0, d: float = 0.9, variant: str = "full", K: float | None = None,
                 rescale_inter: bool = False, **kwargs):
        super().__init__(s=s, **kwargs)
        if not -1.0 <= d <= 1.0:
            raise ValueError(f"D-Softmax intra end point d must lie in [-1, 1], got d={d}")
        names = {v.lower(): v for v in VARIANTS}
        if str(variant).lower() not in names:
            raise ValueError(f"D-Softmax variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        variant = names[str(variant).lower()]
        if variant == "K" and (K is None or not K >= 1):
            raise ValueError(f"D-Softmax variant 'K' needs K >= 1 (negatives sampled at rate 1/K), got K={K}")
        if variant != "K" and K is not None:
            raise ValueError(f"K={K} is only used with variant='K', got variant={variant!r}")
        if rescale_inter and variant != "K":
            raise ValueError("rescale_inter applies to variant='K' only")
        self.d, self.variant, self.K, self.rescale_inter = float(d), variant, K, bool(rescale_inter)

    @property
    def sample_rate(self) -> float | None:
        """The head's sampling rate this variant implies: None (full), 0 (B), 1/K (K)."""
        if self.variant == "full":
            return None
        return 0.0 if self.variant == "B" else 1.0 / self.K

    def row_objective(self) -> RowObjective:
        inter_scale = float(self.K) if self.rescale_inter else 1.0
        return RowObjective(dissected=True, intra_logit=self.s * self.d, inter_scale=inter_scale)

    def extra_repr(self) -> str:
        return (f"d={self.d}, variant={self.variant}, K={self.K}, rescale_inter={self.rescale_inter}, "
                + super().extra_repr())
