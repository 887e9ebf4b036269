"""Backbones for 112x112 face crops, built by name: ``build_backbone("iresnet50", 512)``.

Every backbone maps ``images (N, 3, 112, 112)`` float to ``embeddings (N, embedding_size)``.
``iresnet_tiny`` (few channels, pools the crops to 56x56 inside), ``mobilefacenet_tiny`` and
``vit_tiny`` (2 blocks of width 64) are small variants for CPU demos and tests.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from partialfc.models.iresnet import IRESNET_LAYERS, IResNet
from partialfc.models.mobilefacenet import MobileFaceNet
from partialfc.models.vit import VIT_VARIANTS, VisionTransformer

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(embedding_size=..., **kw) -> nn.Module`` under ``name``."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = builder


def _iresnet(layers):
    return lambda embedding_size=512, **kw: IResNet(layers, embedding_size=embedding_size, **kw)


for _name, _layers in IRESNET_LAYERS.items():
    register_backbone(_name, _iresnet(_layers))
register_backbone("iresnet_tiny", lambda embedding_size=128, **kw: IResNet(**{
    "layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "stem_stride": 2, "input_size": 56,
    "embedding_size": embedding_size, **kw}))
register_backbone("mobilefacenet", lambda embedding_size=512, **kw: MobileFaceNet(embedding_size, scale=2, **kw))
register_backbone("mbf", BACKBONES["mobilefacenet"])
register_backbone("mobilefacenet_large", lambda embedding_size=512, **kw: MobileFaceNet(
    embedding_size, scale=4, blocks=(2, 8, 12, 4), **kw))
register_backbone("mobilefacenet_tiny", lambda embedding_size=128, **kw: MobileFaceNet(
    embedding_size, scale=1, blocks=(1, 1, 1, 1), **kw))


def _vit(variant):
    return lambda embedding_size=512, **kw: VisionTransformer(embedding_size, **{**variant, **kw})


for _name, _variant in VIT_VARIANTS.items():
    register_backbone(_name, _vit(_variant))
register_backbone("vit_tiny", lambda embedding_size=128, **kw: VisionTransformer(embedding_size, **{
    "embed_dim": 64, "depth": 2, "num_heads": 4, "drop_path_rate": 0.1, "mask_ratio": 0.1, **kw}))


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Instantiate the backbone registered as ``name``; ``kwargs`` go to its constructor
    (e.g. ``dropout``, ``gradient_checkpointing``). Unknown names or options raise
    ``ValueError`` listing what is valid."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    try:
        return BACKBONES[name](embedding_size=embedding_size, **kwargs)
    except TypeError as err:
        raise ValueError(f"invalid options {sorted(kwargs)} for backbone {name!r}: {err}") from err


__all__ = ["BACKBONES", "IResNet", "MobileFaceNet", "VisionTransformer", "build_backbone", "list_backbones",
           "register_backbone"]
