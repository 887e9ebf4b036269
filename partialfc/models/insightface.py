"""Weights from insightface's arcface_torch under partialfc's module names.

arcface_torch saves ``torch.save(backbone.state_dict())`` with its own names (``conv1``,
``layer3.13.bn2.weight``, ``features.layers.2.weight``); ours differ (``stem``, ``blocks``,
``head`` / ``gdc``), but for the same architecture both register the same tensors in the same
order (475 of them for iresnet50). :func:`convert_state_dict` pairs them in that order and
checks that each pair agrees in kind (``weight``, ``running_var``, ...) and shape, so a model
built here computes what insightface's computes, bit for bit in eval mode. The ViTs
(:mod:`partialfc.models.vit`) carry arcface_torch's own names and are taken by name.
"""

from __future__ import annotations

import torch

from partialfc.errors import CheckpointError
from partialfc.models import build_backbone
from partialfc.torch_files import load_plain

# arcface_torch's get_model names -> ours (the ViTs keep theirs: :mod:`partialfc.models.vit`)
INSIGHTFACE_NAMES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
                     "r200": "iresnet200", "mbf": "mobilefacenet", "mbf_large": "mobilefacenet_large",
                     **{name: name for name in ("vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b",
                                                "vit_b_dp005_mask_005", "vit_l", "vit_l_dp005_mask_005")}}


def embedding_size_of(state: dict[str, torch.Tensor]) -> int:
    """The embedding width of an arcface_torch state dict: the size of its last BatchNorm
    (every family ends in a BatchNorm1d over the embedding)."""
    if "feature.3.running_var" in state:  # a ViT's last BatchNorm, wherever the dict lists it
        return state["feature.3.running_var"].shape[0]
    sizes = [t.shape[0] for k, t in state.items() if k.endswith("running_var")]
    if not sizes:
        raise CheckpointError("not a backbone state dict: it holds no BatchNorm statistics")
    return sizes[-1]


def convert_state_dict(state: dict[str, torch.Tensor], backbone: str,
                       embedding_size: int | None = None) -> dict[str, torch.Tensor]:
    """``state`` (arcface_torch names, an optional DDP ``module.`` prefix) renamed for
    ``build_backbone(backbone, embedding_size)`` (``backbone`` may be insightface's name,
    e.g. ``r50``). Raises :class:`CheckpointError` naming the first tensor that does not fit."""
    name = INSIGHTFACE_NAMES.get(backbone, backbone)
    source = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):
        ours = build_backbone(name, embedding_size or embedding_size_of(source)).state_dict()
    if len(source) != len(ours):
        raise CheckpointError(f"the state dict holds {len(source)} tensors, {name} has {len(ours)}: "
                              f"not an arcface_torch {name}")
    if source.keys() == ours.keys():  # the same names (the ViTs): paired by name, whatever the order
        source = {k: source[k] for k in ours}
    converted = {}
    for (their_key, tensor), (our_key, like) in zip(source.items(), ours.items()):
        if their_key.rsplit(".", 1)[-1] != our_key.rsplit(".", 1)[-1] or tensor.shape != like.shape:
            raise CheckpointError(f"{their_key} {tuple(tensor.shape)} does not fit {name}'s {our_key} "
                                  f"{tuple(like.shape)}: not an arcface_torch {name}")
        converted[our_key] = tensor
    return converted


def read_insightface(path: str, backbone: str, embedding_size: int | None = None) -> dict:
    """The backbone record (:mod:`partialfc.eval.export` format) of an arcface_torch
    ``model.pt``."""
    state = load_plain(path, "insightface weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (torch.save(model.state_dict()))")
    converted = convert_state_dict(state, backbone, embedding_size)
    return {"backbone": INSIGHTFACE_NAMES.get(backbone, backbone), "embedding_size": embedding_size_of(converted),
            "options": {}, "state_dict": converted}
