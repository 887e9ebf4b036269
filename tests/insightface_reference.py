"""Reference networks with insightface's arcface_torch module names, written here from the
published architecture (they do not come from insightface), for the import and ONNX tests.

IResNet = 3x3 stem conv1/bn1/prelu, layer1..layer4 of pre-activation blocks (bn1, conv1, bn2,
prelu, conv2 with the stride, bn3, a 1x1 conv + BN ``downsample`` on the first block of a
stage), then bn2, dropout, fc, features (BatchNorm1d). MobileFaceNet = ``layers`` (ConvBlock /
DepthWise / Residual, each a ``layers`` Sequential), ``conv_sep``, ``features`` (GDC: 7x7
depthwise conv + BN, flatten, linear, BatchNorm1d). ViT = ``patch_embed.proj`` (9x9 conv, stride
9: 144 tokens), ``pos_embed``, ``mask_token`` (training only), ``blocks`` (LayerNorm ``norm1``
and ``norm2``, ``attn.qkv`` without bias and ``attn.proj``, ``mlp.fc1``/``fc2`` with ReLU6),
``norm``, ``feature`` (linear 144 D -> D, BatchNorm1d, linear D -> embedding, BatchNorm1d, eps
2e-5); here in eval form, attention written out as softmax(q k^T / sqrt(head_dim)) v.
"""

import torch
from torch import nn


class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class RefIResNet(nn.Module):
    def __init__(self, layers, embedding_size):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            setattr(self, f"layer{i + 1}", nn.Sequential(RefBlock(cin, width, 2),
                                                         *[RefBlock(width, width, 1) for _ in range(n - 1)]))
            cin = width
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


class RefConv(nn.Module):  # ConvBlock (with PReLU) and LinearBlock (without)
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, act=True):
        super().__init__()
        parts = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*parts, *([nn.PReLU(cout)] if act else []))

    def forward(self, x):
        return self.layers(x)


class RefDepthWise(nn.Module):
    def __init__(self, cin, cout, residual, stride, groups):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(RefConv(cin, groups), RefConv(groups, groups, 3, stride, 1, groups=groups),
                                    RefConv(groups, cout, act=False))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class RefResidual(nn.Module):
    def __init__(self, c, n, groups):
        super().__init__()
        self.layers = nn.Sequential(*[RefDepthWise(c, c, True, 1, groups) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class RefGDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(RefConv(512, 512, 7, groups=512, act=False), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class RefMobileFaceNet(nn.Module):
    def __init__(self, embedding_size, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        c = 64 * scale
        first = RefConv(c, c, 3, 1, 1, groups=64) if blocks[0] == 1 else RefResidual(c, blocks[0], 128)
        self.layers = nn.ModuleList([
            RefConv(3, c, 3, 2, 1), first,
            RefDepthWise(c, c, False, 2, 128), RefResidual(c, blocks[1], 128),
            RefDepthWise(c, 2 * c, False, 2, 256), RefResidual(2 * c, blocks[2], 256),
            RefDepthWise(2 * c, 2 * c, False, 2, 512), RefResidual(2 * c, blocks[3], 256)])
        self.conv_sep = RefConv(2 * c, 512)
        self.features = RefGDC(embedding_size)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


class RefViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        # qkv's output channels: q | k | v, each split into heads of d // heads channels
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.attn.qkv(self.norm1(x)).chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(torch.clamp(self.mlp.fc1(self.norm2(x)), 0.0, 6.0))


class RefViT(nn.Module):
    def __init__(self, dim, depth, embedding_size, heads=8):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 144, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 9, 9)
        self.blocks = nn.ModuleList(RefViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(144 * dim, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, embedding_size, bias=False),
                                     nn.BatchNorm1d(embedding_size, eps=2e-5))

    def forward(self, x):  # eval: no token masking, no stochastic depth
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.feature(self.norm(x).flatten(1))


VIT = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}  # width, depth
IRESNET = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
           "r200": (6, 26, 60, 6)}


def reference(name, embedding_size=512):
    if name in IRESNET:
        return RefIResNet(IRESNET[name], embedding_size)
    if name in VIT:
        return RefViT(*VIT[name], embedding_size)
    return RefMobileFaceNet(embedding_size, *(((2, 8, 12, 4), 4) if name == "mbf_large" else ()))


def randomised(model, seed=0):
    """Random weights and BatchNorm statistics (a trained model's, not an initial one's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                t.fill_(7)
            elif key.endswith("running_var") or key.endswith("prelu.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return model.eval()


def imported(folder, name, embedding_size):
    """The reference ``name`` with random weights, saved as arcface_torch saves it
    (``folder/insightface.pt``) and imported by ``partialfc export import-insightface`` into
    ``folder/bb.pt``; returns the reference."""
    from partialfc.cli import main

    ref = randomised(reference(name, embedding_size))
    torch.save(ref.state_dict(), folder / "insightface.pt")
    assert main(["export", "import-insightface", str(folder / "insightface.pt"), str(folder / "bb.pt"),
                 "--backbone", name]) == 0
    return ref
