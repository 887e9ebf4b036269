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
