"""MobileFaceNet (insightface's ``mbf``): depthwise-separable bottlenecks, then a global
depthwise conv (GDC) and a linear layer to the embedding."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from partialfc.models.registry import register_backbone


class ConvBlock(nn.Sequential):
    """Conv -> BN (-> PReLU unless ``linear``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, linear: bool = False):
        layers = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([] if linear else [nn.PReLU(cout)]))


class DepthWise(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(cin, groups), ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    ConvBlock(groups, cout, linear=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


def residual_stage(channels: int, num_blocks: int, groups: int) -> list[nn.Module]:
    return [DepthWise(channels, channels, groups, 1, residual=True) for _ in range(num_blocks)]


class MobileFaceNet(nn.Module):
    """``images (N, 3, 112, 112) -> embeddings (N, embedding_size)``.

    ``scale`` multiplies the channel widths (insightface's mbf uses 2, mbf_large 4; 1 is
    smaller); ``blocks``: residual blocks in the 56/28/14/7 px stages. Group sizes follow
    insightface (the first stage's single 3x3 conv has 64 groups, its residual blocks expand
    to 128 channels), so its weights load unchanged (:mod:`partialfc.models.insightface`)."""

    def __init__(self, embedding_size: int = 512, scale: int = 2, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 input_size: int = 112, gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        c = 64 * scale
        layers: list[nn.Module] = [ConvBlock(3, c, 3, 2, 1)]
        layers += [ConvBlock(c, c, 3, 1, 1, groups=64)] if blocks[0] == 1 else residual_stage(c, blocks[0], 128)
        layers += [DepthWise(c, c, 128, 2, residual=False), *residual_stage(c, blocks[1], 128),
                   DepthWise(c, 2 * c, 256, 2, residual=False), *residual_stage(2 * c, blocks[2], 256),
                   DepthWise(2 * c, 2 * c, 512, 2, residual=False), *residual_stage(2 * c, blocks[3], 256)]
        self.layers = nn.ModuleList(layers)
        size = input_size // 16
        self.conv_sep = ConvBlock(2 * c, 512, 1)
        self.gdc = nn.Sequential(ConvBlock(512, 512, size, groups=512, linear=True), nn.Flatten(),
                                 nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.gdc(self.conv_sep(x))


@register_backbone("mobilefacenet", "mbf")
def mobilefacenet(embedding_size: int = 512, **kw) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, scale=2, **kw)


@register_backbone("mobilefacenet_large")
def mobilefacenet_large(embedding_size: int = 512, **kw) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, scale=4, blocks=(2, 8, 12, 4), **kw)


@register_backbone("mobilefacenet_tiny")
def mobilefacenet_tiny(embedding_size: int = 128, **kw) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, scale=1, blocks=(1, 1, 1, 1), **kw)
