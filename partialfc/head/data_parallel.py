"""The one adjustment a data-parallel backbone needs in front of the head."""

from __future__ import annotations

import torch

from partialfc import dist as pdist


def scale_for_data_parallel(embeddings: torch.Tensor, group=None) -> torch.Tensor:
    """``embeddings (b, D)``, unchanged, whose gradient is multiplied by the size of ``group``.

    The head hands each rank the exact gradient of the global-batch mean loss for its own
    rows; DDP and DeepSpeed then *average* the backbone gradients over the ranks. Scaled by
    the world size first, that average is the gradient of the global mean loss. A no-op on
    one rank and for embeddings that need no gradient."""
    size = pdist.get_world_size(group)
    if size > 1 and embeddings.requires_grad:
        embeddings.register_hook(lambda grad: grad * size)
    return embeddings
