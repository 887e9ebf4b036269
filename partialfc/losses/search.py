"""Random-Softmax and Search-Softmax (ICML 2020, arXiv 2007.06542; losses.md section 4).

The unified form ``p_m = p / (a*p + 1 - a)`` with a constant ``a <= 0`` is exactly the
softmax whose target logit is lowered by ``delta = ln(1 - a)``: CosFace with
``m = ln(1 - a)/s``. The loss is implemented in that logit-shift form, so it composes with
the sharded head unchanged; the search (:mod:`partialfc.train.search`) only calls
:meth:`SearchSoftmax.set_a` each epoch, and the schedule of ``a`` it learned replays with
``schedule=[a_0, a_1, ...]`` (one value per epoch).
"""

from __future__ import annotations

import math

import torch

from partialfc.losses.base import MarginLoss
from partialfc.losses.registry import register_loss
from partialfc.seeding import Stream, seeded_generator


def global_a(x: float, s: float) -> float:
    """The authors' "global" mode: a draw ``x`` of the policy gives ``a = -|x| * exp(s/3)``,
    an equivalent CosFace margin of about ``1/3 + ln|x|/s``."""
    return -abs(float(x)) * math.exp(s / 3.0)


@register_loss("search_softmax")
class SearchSoftmax(MarginLoss):
    """Target logit ``s*c_y - ln(1 - a)``, ``a <= 0`` settable per epoch with :meth:`set_a`.

    ``a = 0`` is NormFace. ``delta = log1p(-a)`` is exact for tiny ``|a|`` and finite for
    huge ones (the authors' global mode scales ``a`` by ``exp(s/3)``). ``schedule``: one ``a``
    per epoch (a search's ``a_schedule.json``), set by :meth:`set_epoch`; epochs past its end
    keep the last value."""

    def __init__(self, s: float = 64.0, a: float = 0.0, schedule: list[float] | None = None, **kwargs):
        super().__init__(s=s, **kwargs)
        self.schedule = [float(v) for v in schedule] if schedule else None
        for value in self.schedule or ():
            self.set_a(value)  # validates every entry now
        self.set_a(self.schedule[0] if self.schedule else a)

    def set_epoch(self, epoch: int) -> float:
        """With a schedule, set epoch ``epoch``'s ``a``; returns the current ``a``."""
        if self.schedule:
            self.set_a(self.schedule[min(int(epoch), len(self.schedule) - 1)])
        return self.a

    def set_a(self, a: float) -> None:
        """Set the probability-reduction parameter ``a <= 0`` (finite)."""
        a = float(a)
        if not (math.isfinite(a) and a <= 0):
            raise ValueError(f"Search-Softmax needs a finite a <= 0, got a={a}")
        self.a = a
        self.delta = math.log1p(-a) + 0.0  # never -0.0

    @property
    def margin(self) -> float:
        """The equivalent CosFace margin ``ln(1 - a)/s``."""
        return self.delta / self.s

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return self.s * cos_target - self.delta  # shift in logit units: no rounding through /s

    def extra_repr(self) -> str:
        return f"a={self.a}, delta={self.delta:.6g}, " + super().extra_repr()


@register_loss("random_softmax")
class RandomSoftmax(SearchSoftmax):
    """Random-Softmax: Search-Softmax whose ``a`` is drawn afresh each epoch, never learned.

    :meth:`set_epoch` draws ``x ~ N(mu, sigma)`` from a generator seeded by ``(seed,
    epoch)`` (reproducible on every rank and after a resume) and sets
    ``a = -|x| * exp(s/3)`` (the authors' global scaling), i.e. an equivalent CosFace margin
    of about ``1/3 + ln|x|/s``: 0.25 to 0.33 at s=64 for |x| in [0.005, 1]. The released
    code of this path is broken, so the range is our choice; before the first
    :meth:`set_epoch` the loss is NormFace (``a = 0``)."""

    def __init__(self, s: float = 64.0, mu: float = 0.0, sigma: float = 0.2, seed: int = 0, **kwargs):
        super().__init__(s=s, a=0.0, schedule=None, **kwargs)
        if not sigma > 0:
            raise ValueError(f"Random-Softmax needs sigma > 0, got sigma={sigma}")
        self.mu, self.sigma, self.seed = float(mu), float(sigma), int(seed)

    def set_epoch(self, epoch: int) -> float:
        """Draw and set this epoch's ``a``; returns it."""
        gen = seeded_generator(self.seed, Stream.RANDOM_SOFTMAX, int(epoch))
        x = self.mu + self.sigma * torch.randn((), generator=gen, dtype=torch.float64).item()
        self.set_a(global_a(x, self.s))
        return self.a

    def extra_repr(self) -> str:
        return f"mu={self.mu}, sigma={self.sigma}, seed={self.seed}, " + super().extra_repr()
