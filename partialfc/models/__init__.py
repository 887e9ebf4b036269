"""Backbones for 112x112 face crops, built by name: ``build_backbone("iresnet50", 512)``.

Every backbone maps ``images (N, 3, 112, 112)`` float to ``embeddings (N, embedding_size)``.
``iresnet_tiny`` (few channels, pools the crops to 56x56 inside), ``mobilefacenet_tiny`` and
``vit_tiny`` (2 blocks of width 64) are small variants for CPU demos and tests. Each variant is
a builder function registered at its definition (:mod:`partialfc.models.registry`);
``list_backbones("iresnet*")`` lists the names matching a pattern.
"""

from __future__ import annotations

from partialfc.models.iresnet import IResNet
from partialfc.models.mobilefacenet import MobileFaceNet
from partialfc.models.registry import BACKBONES, build_backbone, list_backbones, register_backbone
from partialfc.models.vit import VisionTransformer

__all__ = ["BACKBONES", "IResNet", "MobileFaceNet", "VisionTransformer", "build_backbone", "list_backbones",
           "register_backbone"]
