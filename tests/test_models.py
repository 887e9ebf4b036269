"""Every registered backbone maps 112x112 crops to embeddings the same way."""

import pytest
import torch

from partialfc.models import BACKBONES, build_backbone, list_backbones

SMALL = ["iresnet_tiny", "mobilefacenet_tiny", "iresnet18", "mbf"]


@pytest.mark.parametrize("name", SMALL)
def test_backbone_shape_and_gradient(name):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=24)
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 24) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_backbone(name, embedding_size=8, gradient_checkpointing=checkpointing)
        torch.manual_seed(1)
        model(torch.randn(3, 3, 112, 112)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_registry_lists_published_backbones_and_rejects_unknown_names():
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="iresnet50"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="widht"):
        build_backbone("iresnet_tiny", widht=3)
    assert list_backbones() == sorted(BACKBONES)


def test_iresnet50_has_the_published_size():
    # arcface_torch's r50 with a 512-d embedding has 43.6M parameters
    model = build_backbone("iresnet50", 512)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 43.6) < 0.1
