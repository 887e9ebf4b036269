"""insightface (arcface_torch) weights load into partialfc's backbones and compute the same
embeddings, bit for bit in eval mode, against reference networks written from the
architecture description with insightface's module names (tests/insightface_reference.py).
"""

import pytest
import torch

from partialfc.errors import CheckpointError, PartialFCError
from partialfc.models import build_backbone
from partialfc.models.insightface import convert_state_dict, read_insightface
from tests.insightface_reference import randomised, reference


@pytest.mark.parametrize("name, ours", [("r18", "iresnet18"), ("mbf", "mobilefacenet"), ("r34", "iresnet34")])
def test_imported_weights_compute_insightfaces_embeddings_bit_for_bit(tmp_path, name, ours):
    ref = randomised(reference(name, 128))
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    record = read_insightface(str(tmp_path / "model.pt"), name)
    assert (record["backbone"], record["embedding_size"]) == (ours, 128)
    model = build_backbone(ours, 128)
    model.load_state_dict(record["state_dict"])
    model.eval()
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("name, ours", [("r50", "iresnet50"), ("r100", "iresnet100"), ("r200", "iresnet200"),
                                        ("mbf_large", "mobilefacenet_large")])
def test_every_published_size_converts_tensor_for_tensor(name, ours):
    with torch.device("meta"):
        state = reference(name).state_dict()
        expected = build_backbone(ours, 512).state_dict()
    converted = convert_state_dict(state, ours)
    assert list(converted) == list(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert [t is s for t, s in zip(converted.values(), state.values())] == [True] * len(state)
    if name == "r50":
        assert len(converted) == 475


def test_ddp_prefix_is_accepted_and_a_wrong_architecture_is_refused():
    with torch.device("meta"):
        state = reference("r18", 64).state_dict()
    assert len(convert_state_dict({f"module.{k}": v for k, v in state.items()}, "r18")) == len(state)
    with pytest.raises(CheckpointError, match="tensors, iresnet34 has"):
        convert_state_dict(state, "iresnet34")
    with pytest.raises(PartialFCError, match="does not fit"):
        convert_state_dict({**state, "fc.weight": torch.empty(64, 100, device="meta")}, "r18")
