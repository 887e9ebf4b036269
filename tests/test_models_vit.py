"""The ViTs: insightface's variants and parameter names, token masking in training only,
arcface_torch weights imported by the CLI computing what a reference network written from the
architecture description computes, ONNX export, DDP and DeepSpeed training, the recipes."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime
import pytest
import torch

from partialfc.cli import main
from partialfc.eval.onnx import export_onnx
from partialfc.models import VisionTransformer, build_backbone
from partialfc.models.insightface import convert_state_dict
from partialfc.testing.multiprocess import run_distributed
from partialfc.train.artifacts import load_backbone
from partialfc.train.config import load_config
from partialfc.train.logging import read_metrics
from tests import test_models
from tests.insightface_reference import imported, reference
from tests.train_helpers import tiny_overrides

# name: width, depth, heads, last block's stochastic depth, masked fraction (arcface_torch's get_model)
VARIANTS = {"vit_t": (256, 12, 8, 0.1, 0.1), "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0),
            "vit_s": (512, 12, 8, 0.1, 0.1), "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0),
            "vit_b": (512, 24, 8, 0.1, 0.1), "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05),
            "vit_l": (768, 24, 8, 0.1, 0.1), "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.05)}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_have_insightfaces_sizes(name):
    width, depth, heads, drop_path, mask = VARIANTS[name]
    with torch.device("meta"):
        model = build_backbone(name, 512)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, depth, heads)
    assert model.num_patches == 144 and model.patch_embed.proj.kernel_size == (9, 9)
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[-1].drop_path.p == pytest.approx(drop_path)
    assert model.mask_ratio == mask and model.mask_token.requires_grad == (mask > 0)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].mlp.fc1.out_features == 4 * width
    assert model.feature[3].num_features == 512 and model.feature[1].eps == model.feature[3].eps == 2e-5


def test_masking_keeps_int_of_the_unmasked_fraction_and_puts_tokens_back():
    model = build_backbone("vit_tiny", 16)
    x = torch.randn(5, 144, 64)
    kept, restore = model._mask(x)
    assert kept.shape == (5, 129, 64)  # int(144 * 0.9)
    back = torch.cat([kept, torch.zeros(5, 15, 64)], 1).gather(1, restore[..., None].expand(-1, -1, 64))
    unmasked = back.abs().sum(-1) > 0
    assert (unmasked.sum(1) == 129).all()
    assert torch.equal(back[unmasked], x[unmasked])


def test_training_masks_and_drops_eval_is_deterministic_and_ignores_the_ratio():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 24)
    x = torch.randn(4, 3, 112, 112)
    out = model(x)
    assert out.shape == (4, 24) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.mask_token.grad.abs().sum() > 0
    assert not torch.equal(model(x), model(x))  # new masks and dropped paths each call
    model.eval()
    with torch.no_grad():
        first = model(x)
        model.mask_ratio = 0.0
        assert torch.equal(model(x), first)


def test_vit_tiny_passes_the_checks_of_every_backbone():
    """Shape and gradients; gradient checkpointing (masks and dropped paths recomputed alike)."""
    test_models.test_backbone_shape_and_gradient("vit_tiny")
    test_models.test_gradient_checkpointing_gives_the_same_gradients("vit_tiny")


def test_autocast_keeps_the_attention_in_float32():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert relative_difference(mixed.float(), full) < 0.05


def test_bad_options_and_inputs_are_value_errors():
    for options, message in [({"widht": 3}, "widht"), ({"mask_ratio": 1.0}, "mask_ratio"),
                             ({"num_heads": 5}, "multiple of num_heads")]:
        with pytest.raises(ValueError, match=message):
            build_backbone("vit_tiny", 8, **options)
    with pytest.raises(ValueError, match="112x112"):
        build_backbone("vit_tiny", 8)(torch.randn(2, 3, 56, 56))


@pytest.fixture(scope="module")
def imported_vit_t(tmp_path_factory):
    """insightface's vit_t with random weights (the reference network), saved as arcface_torch
    saves it and imported by the CLI; returns (folder, reference)."""
    folder = tmp_path_factory.mktemp("vit")
    return folder, imported(folder, "vit_t", 64)


def test_imported_vit_t_computes_insightfaces_embeddings(imported_vit_t):
    folder, ref = imported_vit_t
    model = load_backbone(str(folder / "bb.pt"))
    assert isinstance(model, VisionTransformer) and not model.training
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    difference = relative_difference(ours, theirs)
    print(f"vit_t imported from insightface: max |ours - reference| / max |reference| = {difference:.2e}")
    assert ours.shape == (3, 64) and difference < 1e-5


@pytest.mark.parametrize("name", ["vit_s", "vit_b", "vit_l"])
def test_larger_vits_have_insightfaces_state_dict(name):
    with torch.device("meta"):
        theirs = reference(name).state_dict()
        ours = build_backbone(name, 512).state_dict()
    assert [(k, t.shape) for k, t in theirs.items()] == [(k, t.shape) for k, t in ours.items()]
    converted = convert_state_dict(dict(reversed(theirs.items())), name)  # by name, in any order
    assert list(converted) == list(ours) and all(converted[k] is theirs[k] for k in ours)


@pytest.mark.required
def test_onnx_export_of_vit_t_equals_the_reference(imported_vit_t):
    """What ``partialfc export onnx`` writes (its own check at batch 1 and 8 left out, for time)."""
    folder, ref = imported_vit_t
    export_onnx(load_backbone(str(folder / "bb.pt")), str(folder / "vit_t.onnx"))
    session = onnxruntime.InferenceSession(str(folder / "vit_t.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(2)
    for batch in (1, 3):  # the batch is dynamic
        x = torch.randn(batch, 3, 112, 112, generator=g)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = ref(x).numpy()
        assert got.shape == (batch, 64) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _train(rank, world, overrides):
    from partialfc.train.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = Trainer(load_config(None, overrides))
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.train()
    after = trainer.engine.module.state_dict()
    return {"backbone": {k: v.clone() for k, v in after.items()},
            "changed": [k for k in after if not torch.equal(after[k], before[k])]}


def _assert_trained_alike(results, run_dir, steps):
    losses = [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert len(losses) == steps and all(np.isfinite(losses))
    first, second = (r["backbone"] for r in results)
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert all("running_" in k for k in differ), differ  # one model (BatchNorm statistics are each rank's)
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "feature.2.weight"} <= set(
        results[0]["changed"])
    return results[0]["changed"]


@pytest.mark.required
@pytest.mark.multiprocess
def test_vit_trains_under_ddp_on_two_ranks(tmp_path, cache):
    """Without masking (the WebFace42M variants) and with recomputed blocks: the frozen
    mask token must not stall DDP's gradient reduction."""
    run_dir = str(tmp_path / "ddp")
    results = run_distributed(_train, 2, tiny_overrides(run_dir, cache, "model.backbone=vit_tiny",
                                                        "model.options={mask_ratio: 0.0}",
                                                        "model.gradient_checkpointing=true", "optim.name=adamw",
                                                        "optim.lr=0.001", "train.max_steps=3", "eval.at_end=false"))
    assert "mask_token" not in _assert_trained_alike(results, run_dir, 3)


@pytest.mark.required
@pytest.mark.multiprocess
def test_vit_trains_in_deepspeed_on_two_ranks(tmp_path, cache):
    pytest.importorskip("deepspeed")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    run_dir = str(tmp_path / "deepspeed")
    results = run_distributed(_train, 2, tiny_overrides(run_dir, cache, "model.backbone=vit_tiny",
                                                        "train.engine=deepspeed", "optim.name=adamw",
                                                        "optim.lr=0.001", "train.max_steps=2", "eval.at_end=false"),
                              timeout=300)
    assert "mask_token" in _assert_trained_alike(results, run_dir, 2)


def test_webface42m_vit_recipes_load_and_render_for_64_gpus(capsys):
    t, b = load_config("configs/webface42m_vit_t.yaml"), load_config("configs/webface42m_vit_b.yaml")
    for cfg in (t, b):
        for optim in (cfg.optim, cfg.head.optimizer):  # one AdamW over backbone and head in arcface_torch
            assert (optim.name, optim.lr, optim.weight_decay) == ("adamw", 0.001, 0.1)
            assert optim.schedule.name == "poly" and optim.schedule.warmup_fraction == 0.1
        assert (cfg.head.sample_rate, cfg.model.embedding_size, cfg.train.epochs) == (0.3, 512, 40)
        assert cfg.loss.name == "cosface" and cfg.loss.params == {"s": 64.0, "m": 0.4}
    assert (t.model.backbone, t.data.batch_size, t.train.grad_accum) == ("vit_t_dp005_mask0", 512, 1)
    assert (b.model.backbone, b.data.batch_size, b.train.grad_accum) == ("vit_b_dp005_mask_005", 256, 12)
    assert b.model.gradient_checkpointing and not t.model.gradient_checkpointing
    capsys.readouterr()
    assert main(["submit", "configs/webface42m_vit_t.yaml", "--gpus-per-node", "8", "--nodes", "8", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=8" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --gpus-per-node=8" in script and "configs/webface42m_vit_t.yaml run_dir=" in script
