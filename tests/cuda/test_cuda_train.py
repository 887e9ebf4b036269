"""CUDA tier: the trainer on one GPU (iresnet50, bf16, exact resume), DeepSpeed ZeRO-1 on one
GPU, and DALI's ``mixed`` (nvJPEG) decoding against the CPU decode."""

from __future__ import annotations

import os

import pytest
import torch

from partialfc.testing import run_distributed
from partialfc.train.config import load_config
from partialfc.train.logging import read_metrics
from tests.cuda.helpers import CUDA_TIER
from tests.train_helpers import tiny_overrides

pytestmark = CUDA_TIER

STEPS, INTERRUPT_AT = 50, 25


def _train(rank, world, overrides, interrupt_at=None):
    """Train to the end: ``(summary, losses of the steps before the interruption)``. With
    ``interrupt_at``, first train that many steps (``train_step`` logs nothing: their losses
    are returned), checkpoint and drop the trainer, then resume in a new one."""
    from partialfc.train.trainer import Trainer

    before = []
    if interrupt_at is not None:
        first = Trainer(load_config(None, overrides))
        assert first.device.type == "cuda" and first.engine.autocast_dtype == torch.bfloat16
        before = [first.train_step()["loss"] for _ in range(interrupt_at)]
        first.save()
        first.logger.close()
        del first
    trainer = Trainer(load_config(None, overrides))
    return trainer.train(), before


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"}


@pytest.mark.multiprocess
def test_iresnet50_bf16_resume_gives_the_same_loss_curve(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (spawned ranks inherit it)
    common = ("model.backbone=iresnet50", "model.embedding_size=512", "train.precision=bf16",
              f"train.max_steps={STEPS}", "data.batch_size=64", "train.deterministic=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(_train, 1, tiny_overrides(straight, cache, *common), backend="nccl", timeout=600)
    _, before = run_distributed(_train, 1, tiny_overrides(resumed, cache, *common), INTERRUPT_AT, backend="nccl",
                                timeout=600)[0]
    a, b = _losses(straight), _losses(resumed)
    # the resumed run logs the steps after the checkpoint, each once; the ones before it ran
    # through train_step, which returns its loss and logs nothing
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == list(range(INTERRUPT_AT + 1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(list(a.values()))))
    assert before == [a[s] for s in range(1, INTERRUPT_AT + 1)]
    assert [b[s] for s in range(INTERRUPT_AT + 1, STEPS + 1)] == [a[s] for s in range(INTERRUPT_AT + 1, STEPS + 1)]
    assert sum(a[s] for s in range(STEPS - 4, STEPS + 1)) < sum(a[s] for s in range(1, 6))  # it learns


@pytest.mark.multiprocess
def test_an_nccl_world_of_one_running_every_collective_trains_and_evaluates(tmp_path, cache, monkeypatch):
    """The multi-GPU code paths on one GPU: with the single-process shortcuts off, every
    collective of the trainer, head, checkpoint and verification goes to NCCL (a host tensor
    handed to it fails here in seconds)."""
    from partialfc.ops.collectives import ALWAYS_COMMUNICATE

    monkeypatch.setenv(ALWAYS_COMMUNICATE, "1")  # spawned ranks inherit it
    summary, _ = run_distributed(_train, 1, tiny_overrides(tmp_path, cache, "train.max_steps=3", "eval.at_end=true"),
                                 backend="nccl", timeout=300)[0]
    assert summary["step"] == 3 and 0 < summary["accuracy"] <= 1 and summary["skipped_steps"] == 0


def _deepspeed(rank, world, overrides):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    resumed = Trainer(load_config(None, [*overrides, "train.max_steps=6"]))
    same = all(torch.equal(a, b) for a, b in zip(trainer.engine.module.state_dict().values(),
                                                 resumed.engine.module.state_dict().values()))
    return resumed.step, same, resumed.train()["step"]


@pytest.mark.multiprocess
def test_deepspeed_zero1_on_one_gpu(tmp_path, cache):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "zero1"
    overrides = tiny_overrides(run_dir, cache, "train.engine=deepspeed", "train.deepspeed.zero_stage=1",
                               "train.precision=bf16", "train.max_steps=4")
    resumed_at, same, end = run_distributed(_deepspeed, 1, overrides, backend="nccl", timeout=600)[0]
    assert resumed_at == 4 and same and end == 6
    losses = list(_losses(run_dir).values())
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_dali_mixed_decoding_matches_the_cpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    from partialfc.data.dali_loader import DaliLoader
    from partialfc.data.dataset_index import open_dataset
    from partialfc.data.torch_loader import TorchLoader
    from tests.data_helpers import write_unique_label_dataset

    write_unique_label_dataset(tmp_path / "u", 64)
    dataset = open_dataset(tmp_path / "u")
    kwargs = dict(rank=0, world_size=1, shuffle=False, flip=False, drop_last=False)
    gpu_images, gpu_labels = next(iter(DaliLoader(dataset, 32, device="cuda", **kwargs)))
    cpu_images, cpu_labels = next(iter(TorchLoader(dataset, 32, device="cpu", num_workers=0, **kwargs)))
    assert gpu_images.device.type == "cuda"
    assert gpu_labels.tolist() == cpu_labels.tolist() == list(range(32))
    diff = (gpu_images.cpu() - cpu_images).abs() * 127.5  # in uint8 levels; the CPU tests' bound
    assert diff.max() <= 6 and diff.mean() < 0.5, (diff.max(), diff.mean())
