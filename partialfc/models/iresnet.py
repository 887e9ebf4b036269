"""Improved ResNets (IResNet) for 112x112 face crops, as in insightface's arcface_torch.

Body: 3x3 stem, four stages of pre-activation basic blocks (BN-conv-BN-PReLU-conv-BN), each
stage halving the resolution; embedding head BN2d -> Dropout -> FC -> BN1d.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from partialfc.models.registry import register_backbone


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), conv3x3(cin, cout), nn.BatchNorm2d(cout, eps=1e-5),
                                  nn.PReLU(cout), conv3x3(cout, cout, stride), nn.BatchNorm2d(cout, eps=1e-5))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.body(x) + identity


def conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3 / padding 1 convolution."""
    return (size - 1) // stride + 1


class EmbeddingHead(nn.Module):
    """``(N, C, H, W)`` feature map -> ``(N, embedding_size)``: BN2d, Dropout, FC, BN1d (the
    last BN's scale is fixed to 1, as in arcface_torch)."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class IResNet(nn.Module):
    """``images (N, 3, input_size, input_size) -> embeddings (N, embedding_size)``.

    ``layers``: blocks per stage; ``widths``: channels per stage (the stem has ``widths[0]``);
    ``stem_stride`` 2 quarters the cost for small models. ``input_size`` below 112 makes the
    network average-pool the 112x112 crops it is given down to that size first (a cheap
    variant for CPU). ``gradient_checkpointing`` recomputes each block in backward instead of
    storing its activations."""

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 stem_stride: int = 1, gradient_checkpointing: bool = False):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={list(layers)} widths={list(widths)}")
        self.gradient_checkpointing = gradient_checkpointing
        self.input_size = input_size
        self.stem = nn.Sequential(conv3x3(3, widths[0], stem_stride), nn.BatchNorm2d(widths[0], eps=1e-5),
                                  nn.PReLU(widths[0]))
        blocks, cin, size = [], widths[0], conv_out(input_size, stem_stride)
        for n, width in zip(layers, widths):
            blocks.append(IBasicBlock(cin, width, 2))
            blocks += [IBasicBlock(width, width, 1) for _ in range(n - 1)]
            cin, size = width, conv_out(size, 2)
        self.blocks = nn.ModuleList(blocks)
        self.head = EmbeddingHead(cin, size, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            x = F.adaptive_avg_pool2d(x, self.input_size)
        x = self.stem(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)


@register_backbone("iresnet18")
def iresnet18(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet((2, 2, 2, 2), embedding_size=embedding_size, **kw)


@register_backbone("iresnet34")
def iresnet34(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet((3, 4, 6, 3), embedding_size=embedding_size, **kw)


@register_backbone("iresnet50")
def iresnet50(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet((3, 4, 14, 3), embedding_size=embedding_size, **kw)


@register_backbone("iresnet100")
def iresnet100(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet((3, 13, 30, 3), embedding_size=embedding_size, **kw)


@register_backbone("iresnet200")
def iresnet200(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet((6, 26, 60, 6), embedding_size=embedding_size, **kw)


@register_backbone("iresnet_tiny")
def iresnet_tiny(embedding_size: int = 128, **kw) -> IResNet:
    """Few channels, a stride-2 stem, the crops pooled to 56x56 inside: a CPU demo."""
    return IResNet(**{"layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "stem_stride": 2, "input_size": 56,
                      "embedding_size": embedding_size, **kw})
