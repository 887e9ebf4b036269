"""Vision Transformers for 112x112 face crops, as insightface's arcface_torch builds them
(``vit_t``, ``vit_s``, ``vit_b``, ``vit_l`` and the WebFace42M variants), under its module
names, so that its weights load as they are (:mod:`partialfc.models.insightface`).

The crop is cut into 9x9 patches (a 12x12 grid: 144 tokens of width ``embed_dim``), a learned
position embedding is added, and during training a random ``mask_ratio`` of the tokens of
each image is dropped before the blocks and replaced by a learned ``mask_token`` after the
final LayerNorm. Blocks are pre-norm: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with
ReLU6 in the MLP (4x wide), no bias in the qkv projection, and stochastic depth rising
linearly from 0 to ``drop_path_rate`` over the blocks. No class token: the 144 normalised
tokens are flattened into the head ``feature`` = Linear(144 * D -> D) -> BN1d -> Linear(D
-> embedding) -> BN1d (both BatchNorms with eps 2e-5).

Attention runs in float32 (under autocast too, as arcface_torch does) through
:func:`torch.nn.functional.scaled_dot_product_attention` with scale ``head_dim ** -0.5``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from partialfc.models.registry import register_backbone


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``p`` of the
    samples and scale the others by ``1 / (1 - p)``; identity in eval. Shape-preserving."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """``(N, L, D) -> (N, L, D)``: fc1 (D -> hidden), ReLU6, dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention ``(N, L, D) -> (N, L, D)``: ``qkv`` (D -> 3D, bias per
    ``qkv_bias``), softmax(q k^T / sqrt(D / num_heads)) v per head in float32, ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        # (N, L, 3D) -> 3 x (N, heads, L, head_dim)
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        full_precision = (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
                          else nullcontext())
        with full_precision:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.to(x.dtype).transpose(1, 2).reshape(n, length, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block ``(N, L, D) -> (N, L, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, dropout: float,
                 attn_dropout: float, drop_path: float):
        super().__init__()
        # registration order as arcface_torch's (its state dicts list norm1, norm2, attn, mlp)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout, dropout)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """``images (N, 3, S, S) -> tokens (N, (S // patch)^2, D)``: a patch x patch conv with
    stride patch (a 112 px crop at patch 9: the 12x12 grid of its top-left 108x108)."""

    def __init__(self, input_size: int, patch_size: int, dim: int):
        super().__init__()
        self.input_size = input_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"this ViT takes {self.input_size}x{self.input_size} crops, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """``images (N, 3, 112, 112) -> embeddings (N, embedding_size)``.

    Options, under arcface_torch's names where it has one: ``embed_dim`` (token width D),
    ``depth`` (blocks), ``num_heads``, ``mlp_ratio``, ``patch_size``, ``qkv_bias``,
    ``drop_path_rate`` (the last block's stochastic depth), ``mask_ratio`` (fraction of the
    tokens masked per image in training; 0 = none, and ``mask_token`` is then frozen so that
    DDP sees no unused parameter), ``dropout`` (its ``drop_rate``: after the position embedding,
    the attention projection and in the MLP), ``attn_dropout`` (its ``attn_drop_rate``, on the
    attention weights), ``gradient_checkpointing`` (its ``using_checkpoint``: recompute each
    block in backward; arcface_torch turns it on for vit_b and vit_l)."""

    def __init__(self, embedding_size: int = 512, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, patch_size: int = 9, input_size: int = 112, qkv_bias: bool = False,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.1, dropout: float = 0.0,
                 attn_dropout: float = 0.0, gradient_checkpointing: bool = False):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.embed_dim, self.mask_ratio = embed_dim, mask_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = PatchEmbed(input_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta default
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dropout, attn_dropout, rate)
                                     for rate in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
                                     nn.BatchNorm1d(embed_dim, eps=2e-5),
                                     nn.Linear(embed_dim, embedding_size, bias=False),
                                     nn.BatchNorm1d(embedding_size, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=mask_ratio > 0)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (N, L, D) -> (kept (N, K, D), restore (N, L))``: a random ``K = int(L * (1 -
        mask_ratio))`` of each image's tokens; ``restore`` puts them back in place."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        order = torch.rand(n, length, device=x.device).argsort(dim=1)
        kept = x.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        return kept, order.argsort(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``images (N, 3, 112, 112) -> flattened tokens (N, num_patches * embed_dim)``."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masking:
            n, kept, dim = x.shape
            filler = self.mask_token.to(x.dtype).expand(n, self.num_patches - kept, dim)
            x = torch.cat([x, filler], dim=1).gather(1, restore[..., None].expand(-1, -1, dim))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))


def _arcface_vit(embedding_size: int, embed_dim: int, depth: int, drop_path_rate: float, mask_ratio: float,
                 **kw) -> VisionTransformer:
    """One of arcface_torch's ViTs (8 heads); ``kw`` override its options."""
    return VisionTransformer(embedding_size, **{"embed_dim": embed_dim, "depth": depth, "num_heads": 8,
                                                "drop_path_rate": drop_path_rate, "mask_ratio": mask_ratio, **kw})


# arcface_torch's get_model names (the ``_dp005_*`` ones are its WebFace42M variants; vit_l
# is its vit_l_dp005_mask_005 with the rates of vit_t/s/b). Note that arcface_torch masks 0.1
# of the tokens whenever a ratio above 0 is set (its forward passes no ratio to its masking);
# here each variant masks its own ratio.
@register_backbone("vit_t")
def vit_t(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 256, 12, 0.1, 0.1, **kw)


@register_backbone("vit_t_dp005_mask0")
def vit_t_dp005_mask0(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 256, 12, 0.05, 0.0, **kw)


@register_backbone("vit_s")
def vit_s(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 512, 12, 0.1, 0.1, **kw)


@register_backbone("vit_s_dp005_mask_0")
def vit_s_dp005_mask_0(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 512, 12, 0.05, 0.0, **kw)


@register_backbone("vit_b")
def vit_b(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 512, 24, 0.1, 0.1, **kw)


@register_backbone("vit_b_dp005_mask_005")
def vit_b_dp005_mask_005(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 512, 24, 0.05, 0.05, **kw)


@register_backbone("vit_l")
def vit_l(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 768, 24, 0.1, 0.1, **kw)


@register_backbone("vit_l_dp005_mask_005")
def vit_l_dp005_mask_005(embedding_size: int = 512, **kw) -> VisionTransformer:
    return _arcface_vit(embedding_size, 768, 24, 0.05, 0.05, **kw)


@register_backbone("vit_tiny")
def vit_tiny(embedding_size: int = 128, **kw) -> VisionTransformer:
    """2 blocks of width 64: a CPU demo."""
    return VisionTransformer(embedding_size, **{"embed_dim": 64, "depth": 2, "num_heads": 4, "drop_path_rate": 0.1,
                                                "mask_ratio": 0.1, **kw})
