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


# every registered name and the embedding width its builder gives by default (the tiny CPU
# variants 128, the published ones 512); mbf is insightface's name for mobilefacenet
DEFAULT_SIZES = {
    "iresnet18": 512, "iresnet34": 512, "iresnet50": 512, "iresnet100": 512, "iresnet200": 512, "iresnet_tiny": 128,
    "mobilefacenet": 512, "mbf": 512, "mobilefacenet_large": 512, "mobilefacenet_tiny": 128,
    "vit_t": 512, "vit_t_dp005_mask0": 512, "vit_s": 512, "vit_s_dp005_mask_0": 512, "vit_b": 512,
    "vit_b_dp005_mask_005": 512, "vit_l": 512, "vit_l_dp005_mask_005": 512, "vit_tiny": 128,
}


def test_list_backbones_filters_by_pattern():
    assert list_backbones() == sorted(DEFAULT_SIZES)
    assert list_backbones("iresnet*") == ["iresnet100", "iresnet18", "iresnet200", "iresnet34", "iresnet50",
                                          "iresnet_tiny"]
    assert list_backbones("*_tiny") == ["iresnet_tiny", "mobilefacenet_tiny", "vit_tiny"]
    assert list_backbones("vit_?") == ["vit_b", "vit_l", "vit_s", "vit_t"]
    assert list_backbones("mbf") == ["mbf"] and list_backbones("resnet*") == []


@pytest.mark.parametrize("name", sorted(DEFAULT_SIZES))
def test_every_backbone_builds_with_its_default_embedding_size(name):
    builder = BACKBONES[name]
    if DEFAULT_SIZES[name] == 128:  # the tiny ones: built for real and run
        torch.manual_seed(0)
        assert builder().eval()(torch.randn(2, 3, 112, 112)).shape == (2, 128)
        return
    with torch.device("meta"):
        model = builder()
    last_norm = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
    assert last_norm.num_features == 512


def test_builders_are_named_functions_of_their_modules_and_aliases_share_one():
    from partialfc.models import iresnet, mobilefacenet, vit

    assert BACKBONES["iresnet50"] is iresnet.iresnet50 and BACKBONES["vit_t"] is vit.vit_t
    assert BACKBONES["mbf"] is BACKBONES["mobilefacenet"] is mobilefacenet.mobilefacenet


def test_register_backbone_rejects_a_taken_name_or_alias(monkeypatch):
    from partialfc.models import registry

    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    with pytest.raises(ValueError, match="backbone name 'iresnet50' is already registered to iresnet50"):
        registry.register_backbone("iresnet50")(lambda embedding_size=512: None)
    with pytest.raises(ValueError, match="backbone name 'mbf' is already registered to mobilefacenet"):
        registry.register_backbone("my_net", "mbf")(lambda embedding_size=512: None)
    assert "my_net" not in registry.BACKBONES  # nothing registered when one name is taken

    @registry.register_backbone("my_net", "mine")
    def my_net(embedding_size: int = 8, **kw):
        return torch.nn.Linear(3, embedding_size, **kw)

    assert registry.list_backbones("m*") == ["mbf", "mine", "mobilefacenet", "mobilefacenet_large",
                                             "mobilefacenet_tiny", "my_net"]
    assert build_backbone("mine", 4).out_features == 4
