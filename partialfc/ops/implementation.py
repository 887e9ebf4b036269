"""How the head runs its loss over the sampled centres: one name for the head, the config and
the benches."""

from __future__ import annotations

from partialfc.choices import Choice


class Implementation(Choice):
    """``plain``: form ``cos (B, k)`` and run the loss's plain objective (the reference);
    ``torch``: the fused chunk walk as a PyTorch loop (any device); ``triton``: the same walk
    as a Triton kernel (CUDA; CPU tensors under ``TRITON_INTERPRET=1``); ``auto``: ``torch``
    for a margin loss, else ``plain``."""

    auto = "auto"
    plain = "plain"
    torch = "torch"
    triton = "triton"

    @classmethod
    def parse(cls, value, what: str, allowed: tuple[Implementation, ...] | None = None,
              also: str = "") -> Implementation:
        """``value`` (a member or its name, in any case) as a member of ``allowed`` (default:
        every member); anything else is a one-line ``ValueError`` naming ``what`` and the
        allowed names, then ``also`` (e.g. ``" or a bool"``)."""
        allowed = tuple(cls) if allowed is None else allowed
        member = next((m for m in cls if m.value == str(value).lower()), None)
        if member not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}{also}, got {value!r}")
        return member
