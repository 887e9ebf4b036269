"""End-to-end training on real gloo processes: learning, exact resume, resharding, DeepSpeed,
wandb, and clear errors on bad input."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from partialfc.testing.multiprocess import run_distributed
from partialfc.train.checkpoint import CheckpointError, latest_checkpoint, load_shared
from partialfc.train.config import load_config
from partialfc.train.logging import read_metrics
from partialfc.train.preemption import Preempted, StopRequest
from tests.train_helpers import tiny_overrides


def _train(rank, world, overrides):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    summary = trainer.train()
    return {"summary": summary, "class_start": trainer.head.class_start, "num_local": trainer.head.num_local,
            "weight": trainer.head.weight.detach().clone(),
            "backbone": {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}}


def _assert_learned(run_dir):
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r["accuracy"] for r in records if r["kind"] == "eval"]
    assert len(losses) == 40 and len(evals) == 2  # every step logged; at start and at the end
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert evals[1] > evals[0] + 0.02, evals
    return records


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [1, 2])
def test_training_learns_and_logs(tmp_path, cache, world):
    run_dir = str(tmp_path / "run")
    extra = ["train.max_steps=40", "eval.at_start=true", "log.plot=true"]
    if world == 1:
        extra.append("log.wandb.mode=offline")
    out = run_distributed(_train, world, tiny_overrides(run_dir, cache, *extra))
    records = _assert_learned(run_dir)
    assert all(r["step"] == i + 1 for i, r in enumerate(x for x in records if x["kind"] == "train"))
    assert {"lr_backbone", "lr_head", "samples_per_s", "eta_s", "grad_norm_backbone", "grad_norm_head",
            "data_wait_fraction", "epoch", "skipped_steps"} <= set(records[1])
    assert out[0]["summary"]["accuracy"] == records[-1]["accuracy"]
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000
    assert latest_checkpoint(os.path.join(run_dir, "checkpoints")).endswith("step_00000040")
    if world == 1:  # one offline wandb run holding our metrics, under the run directory
        files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))
        assert len(files) == 1
        data = open(files[0], "rb").read()
        eval_set = os.path.splitext(next(r["set"] for r in records if r["kind"] == "eval"))[0]
        assert b"train/loss" in data and f"eval/{eval_set}/accuracy".encode() in data and b"train/lr_head" in data


class _StopDuring(StopRequest):
    """A stop request that arrives during step ``step`` of ``trainer``, as the stop file or
    SIGTERM would (the trainer reads the flag in the step, before counting it)."""

    def __init__(self, trainer, step: int):
        super().__init__(None)
        self.trainer, self.at_step = trainer, step

    def local_flag(self) -> bool:
        return self.trainer.step + 1 >= self.at_step


def _interrupted_then_resumed(rank, world, overrides, interrupt_at):
    """The real loop until a stop request during step ``interrupt_at``: it logs the steps,
    checkpoints after that one and raises :class:`Preempted`; a new trainer resumes to the end."""
    from partialfc.train.trainer import Trainer

    first = Trainer(load_config(None, overrides))
    first.requests = _StopDuring(first, interrupt_at)
    with pytest.raises(Preempted) as stopped:
        first.train()
    assert stopped.value.step == interrupt_at
    del first
    return _train(rank, world, overrides)


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_resume_is_bitwise_exact(tmp_path, cache, storage):
    """bf16 centres: the resumed optimizer continues the stochastic rounding's streams."""
    common = ("train.deterministic=true", "train.max_steps=6", "log.wandb.mode=offline", f"head.storage={storage}")
    straight = run_distributed(_train, 1, tiny_overrides(tmp_path / "a", cache, *common))[0]
    resumed = run_distributed(_interrupted_then_resumed, 1, tiny_overrides(tmp_path / "b", cache, *common), 3)[0]
    assert torch.equal(straight["weight"], resumed["weight"])
    for key, value in straight["backbone"].items():
        assert torch.equal(value, resumed["backbone"][key]), key
    # the metrics file has each step once (1-3 from the interrupted job, 4-6 from the resumed
    # one), and the resumed job continued the same wandb run
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    # two offline run folders (wandb adds "-1" when both start in the same second), one run id
    runs = glob.glob(str(tmp_path / "b" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 2 and len({os.path.basename(r) for r in runs}) == 1, runs


def _saved_rows(path):
    """Independent reference: the saved shard files concatenated in rank order."""
    files = sorted(glob.glob(os.path.join(path, "head_rank*.pt")))
    parts = [torch.load(f, weights_only=True) for f in files]
    return (torch.cat([p["rows"]["head"]["weight"] for p in parts]),
            torch.cat([p["rows"]["head_optimizer"]["momentum_buffer"] for p in parts]),
            [p["local"]["head"]["class_start"] for p in parts])


def _reshard_check(rank, world, overrides):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    lo, n = trainer.head.class_start, trainer.head.num_local
    momentum = trainer.head_optimizer.state[trainer.head.weight]["momentum_buffer"]
    before = (lo, n, trainer.head.weight.detach().clone(), momentum.clone(), trainer.step)
    summary = trainer.train()
    return before, summary


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("worlds", [(2, 3), (3, 2)])
def test_resume_on_another_world_size(tmp_path, cache, worlds):
    saved_world, new_world = worlds
    run = tmp_path / "run"
    run_distributed(_train, saved_world, tiny_overrides(run, cache, "train.max_steps=3"))
    path = latest_checkpoint(str(run / "checkpoints"))
    weight, momentum, starts = _saved_rows(path)
    assert len(starts) == saved_world and weight.shape[0] == 32
    results = run_distributed(_reshard_check, new_world, tiny_overrides(run, cache, "train.max_steps=6"))
    covered = 0
    for (lo, n, rows, mom, step), summary in results:
        assert lo == covered and step == 3
        assert torch.equal(rows, weight[lo:lo + n]) and torch.equal(mom, momentum[lo:lo + n])
        assert summary["step"] == 6 and torch.isfinite(torch.tensor(summary["loss"]))
        covered += n
    assert covered == 32
    assert load_shared(latest_checkpoint(str(run / "checkpoints")))["meta"]["world_size"] == new_world


def test_bad_input_gives_clear_errors(tmp_path, cache):
    from partialfc.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text("run_dir: x\noptim:\n  lr: 0.1\n  lrr: 0.2\n")
    assert main(["train", str(config)]) == 2
    missing = tiny_overrides(tmp_path / "m", cache, "data.synthetic=null", f"data.rec={tmp_path}/nothing")
    with pytest.raises(FileNotFoundError, match="nothing"):
        _train(0, 1, missing)
    run = tmp_path / "run"
    _train(0, 1, tiny_overrides(run, cache, "train.max_steps=1"))
    with pytest.raises(CheckpointError, match="embedding_size"):
        _train(0, 1, tiny_overrides(run, cache, "train.max_steps=2", "model.embedding_size=16"))
    with pytest.raises(CheckpointError, match="does not fit"):
        _train(0, 1, tiny_overrides(tmp_path / "ft", cache, f"checkpoint.init_backbone={run}",
                                    "model.options={widths: [8, 16, 32, 64]}"))


def _bad_label_at_step_two(rank, world, overrides):
    """Rank 1's second micro-batch of step 2 holds a label past the last class."""
    from partialfc.errors import InputError
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    batches, calls = trainer.batches, []

    def poisoned():
        for images, labels in batches:
            calls.append(None)
            if rank == 1 and len(calls) == 4:
                labels = labels.clone()
                labels[-1] = 999
            yield images, labels

    trainer.batches = poisoned()
    trainer.train_step()
    before = [p.detach().clone() for p in (*trainer.engine.module.parameters(), trainer.head.weight)]
    try:
        trainer.train_step()
        message = "no error"
    except InputError as err:
        message = str(err)
    after = list((*trainer.engine.module.parameters(), trainer.head.weight))
    return message, all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.required
@pytest.mark.multiprocess
def test_a_bad_label_raises_at_the_steps_read_on_every_rank_before_any_update(tmp_path, cache):
    """The trainer's head waits for nothing in its forward (max_batch): its input check rides in
    the step's one read, which raises the same InputError on every rank before any weight moves,
    whichever micro-batch held the bad label."""
    results = run_distributed(_bad_label_at_step_two, 2, tiny_overrides(tmp_path, cache, "train.grad_accum=2"))
    for message, unchanged in results:
        assert message == "label 999 outside [0, 32) (num_classes=32)", message
        assert unchanged


def _accumulate(rank, world):
    from partialfc.train.engine import DDPEngine

    cfg = load_config(None, ["run_dir=unused", "data.rec=unused", "train.grad_accum=2"])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine = DDPEngine(model, cfg.optim, cfg.train, total_steps=10, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    inputs, grads = [torch.randn(3, 4, generator=generator) for _ in range(2)], []
    for i, x in enumerate(inputs):
        with engine.micro_step(last=i == 1):
            engine.backward(engine(x).square().mean(), last=i == 1)
        grads.append(model.weight.grad.clone())
    return inputs, grads


@pytest.mark.required
@pytest.mark.multiprocess
def test_gradient_accumulation_divides_the_loss_and_syncs_once():
    results = run_distributed(_accumulate, 2)
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 1)

    def grad_of(batches):
        reference.zero_grad()
        (sum(reference(x).square().mean() for x in batches) / len(batches)).backward()
        return reference.weight.grad.clone()

    everything = [x for inputs, _ in results for x in inputs]
    for inputs, (inner, final) in results:
        torch.testing.assert_close(inner, grad_of(inputs[:1]) / 2)  # local only: no all-reduce yet
        torch.testing.assert_close(final, grad_of(everything))  # mean over ranks and micro-steps


@pytest.mark.required
@pytest.mark.multiprocess
def test_deepspeed_engine_on_a_single_process_without_launcher(tmp_path, cache):
    """`partialfc train ... train.engine=deepspeed` as a plain process (no torchrun, no MPI)."""
    import subprocess
    import sys

    run_dir = tmp_path / "ds1"
    cmd = [sys.executable, "-m", "partialfc.cli", "train", "configs/demo.yaml",
           *tiny_overrides(run_dir, cache, "train.engine=deepspeed", "train.max_steps=2", "train.threads=1")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert latest_checkpoint(str(run_dir / "checkpoints")).endswith("step_00000002")
    assert os.path.isdir(os.path.join(latest_checkpoint(str(run_dir / "checkpoints")), "deepspeed"))


def test_random_softmax_draws_a_new_a_each_epoch(tmp_path, cache):
    from partialfc.losses import RandomSoftmax
    from partialfc.train.trainer import Trainer

    overrides = [o for o in tiny_overrides(tmp_path / "rs", cache) if not o.startswith("loss.")]
    trainer = Trainer(load_config(None, [*overrides, "loss.name=random_softmax", "loss.params={s: 16.0, seed: 3}"]))
    seen = []
    for _ in range(trainer.steps_per_epoch + 1):
        trainer.train_step()
        seen.append((trainer.loader.epoch, trainer.head.loss.a))
    reference = RandomSoftmax(s=16.0, seed=3)
    assert [a for e, a in seen if e == 0] == [reference.set_epoch(0)] * trainer.steps_per_epoch
    assert seen[-1] == (1, reference.set_epoch(1)) and seen[-1][1] != seen[0][1] < 0
    trainer.logger.close()


def _overflow_on_rank_one(rank, world, overrides):
    """fp16: an inf in rank 1's head shard gradient at step 2 only."""
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    calls = {"n": 0}

    def overflow(grad):  # a hook on rank 1's head shard: its gradient holds an inf at step 2
        calls["n"] += 1
        if rank != 1 or calls["n"] != 2:
            return grad
        grad = grad.coalesce()
        values = grad.values().clone()
        values[0, 0] = float("inf")
        return torch.sparse_coo_tensor(grad.indices(), values, grad.shape)

    trainer.head.weight.register_hook(overflow)
    steps = [(trainer.train_step()["finite"], trainer.engine.scaler.get_scale()) for _ in range(4)]
    return steps, torch.cat([p.detach().flatten() for p in trainer.engine.module.parameters()])


@pytest.mark.required
@pytest.mark.multiprocess
def test_fp16_overflow_on_one_rank_is_skipped_by_all(tmp_path, cache):
    """The skip decision is shared: same finite flags and loss scales, identical backbones."""
    results = run_distributed(_overflow_on_rank_one, 2, tiny_overrides(tmp_path / "fp16", cache, "train.precision=fp16"))
    (steps0, backbone0), (steps1, backbone1) = results
    assert steps0 == steps1 and steps0[1][0] is False  # rank 0 skipped rank 1's overflow too
    scale = 65536.0  # GradScaler's initial scale; fp16 may overflow on its own in early steps
    for finite, after in steps0:  # every skip backs off once, on both ranks alike
        scale = scale if finite else scale / 2
        assert after == scale, steps0
    assert torch.equal(backbone0, backbone1)


def _deepspeed_nan_on_rank_one(rank, world, overrides):
    """ZeRO-1: a NaN in rank 1's backbone gradient at step 2 only, which DeepSpeed finds in its
    step (the gradients are partitioned: the trainer's read comes before the norm exists)."""
    from partialfc.train.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = Trainer(load_config(None, overrides))
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if rank == 1 and calls["n"] == 2 else grad

    next(trainer.engine.module.parameters()).register_hook(poison)
    out = []
    for _ in range(3):
        head_before = trainer.head.weight.detach().clone()
        metrics = trainer.train_step()
        out.append((metrics["finite"], float(metrics["grad_norm_backbone"]),
                    torch.equal(head_before, trainer.head.weight.detach())))
    trainer.close()
    return out, trainer.skipped_steps


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_deepspeed_skips_itself_skips_the_head_on_every_rank(tmp_path, cache, precision):
    """DeepSpeed ZeRO-1 skips a step whose backbone norm is not finite, on the host; the trainer
    learns it from that decision (no read of its own) and leaves the head's shard as it was, on
    both ranks; the steps around it apply."""
    pytest.importorskip("deepspeed")
    overrides = tiny_overrides(tmp_path / precision, cache, "train.engine=deepspeed", f"train.precision={precision}",
                               "train.max_steps=8")
    (steps0, skipped0), (steps1, skipped1) = run_distributed(_deepspeed_nan_on_rank_one, 2, overrides, timeout=600)
    assert [(f, unchanged) for f, _, unchanged in steps0] == [(True, False), (False, True), (True, False)], steps0
    assert [(f, unchanged) for f, _, unchanged in steps1] == [(f, u) for f, _, u in steps0]
    assert steps0[1][1] != steps0[1][1] and steps0[0][1] > 0  # its norm is logged as NaN
    assert skipped0 == skipped1 == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_padded_samples_rows_keep_every_bit_through_the_trainers_steps(tmp_path, cache, optimizer):
    """Rate 0.1 of 32 classes on a batch of 16 (two micro-batches a step): the head's sample is
    padded. Over the trainer's steps, the rows of the head's gradient that took no part keep
    their weights and optimizer state bit for bit, and the ones that did move."""
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, tiny_overrides(
        tmp_path / optimizer, cache, "head.sample_rate=0.1", "train.grad_accum=2", f"head.optimizer.name={optimizer}",
        "head.optimizer.lr=0.01", "train.max_steps=4", "log.every_steps=1000")))
    weight, optim, step = trainer.head.weight, trainer.head_optimizer, trainer.head_optimizer.step
    seen = []

    def recorded(*args, live_rows=None, **kwargs):
        rows = weight.grad._indices()[0]
        before = [weight.detach().clone()] + [v.clone() for v in optim.state[weight].values() if torch.is_tensor(v)]
        step(*args, live_rows=live_rows, **kwargs)
        after = [weight.detach()] + [v for v in optim.state[weight].values() if torch.is_tensor(v)]
        padding, live = rows[~live_rows[rows]], rows[live_rows[rows]]
        seen.append((len(padding), all(torch.equal(a[padding], b[padding]) for a, b in zip(after, before)),
                     not torch.equal(after[0][live], before[0][live])))

    optim.step = recorded
    for _ in range(4):
        trainer.train_step()
    trainer.close()
    assert len(seen) == 4 and all(n > 0 and kept and moved for n, kept, moved in seen), seen


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, cache):
    """Extending max_steps on resume: the lr follows the new horizon (not stuck at 0), and
    the head's lr is restored even when its optimizer keeps no state (SGD without momentum)."""
    from partialfc.train.trainer import Trainer

    run = tmp_path / "extend"
    common = ("optim.schedule.name=poly", "head.optimizer.schedule.name=poly", "head.optimizer.momentum=0.0")
    first = Trainer(load_config(None, tiny_overrides(run, cache, "train.max_steps=4", *common)))
    first.train()
    resumed = Trainer(load_config(None, tiny_overrides(run, cache, "train.max_steps=10", *common)))
    assert resumed.step == 4
    fresh = Trainer(load_config(None, tiny_overrides(tmp_path / "ref", cache, "train.max_steps=10", *common)))
    for _ in range(4):
        fresh.train_step()
    lrs = [(trainer.engine.lr, trainer.head_optimizer.param_groups[0]["lr"]) for trainer in (resumed, fresh)]
    assert lrs[0] == pytest.approx(lrs[1]) and min(lrs[0]) > 0
    for trainer in (resumed, fresh):
        trainer.logger.close()


def _backbone_grads(rank, world, overrides, images, labels):
    """One forward/backward of the trainer's step on this rank's slice of a fixed batch."""
    from partialfc.head.data_parallel import scale_for_data_parallel
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    per_rank = len(labels) // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    trainer.engine.module.eval()  # batch norm on running statistics: per-sample, comparable across splits
    embeddings = scale_for_data_parallel(trainer.engine(images[rows]), trainer.group)
    trainer.engine.backward(trainer.head(embeddings, labels[rows]), True)
    return torch.cat([p.grad.flatten() for p in trainer.engine.module.parameters() if p.grad is not None])


@pytest.mark.required
@pytest.mark.multiprocess
def test_backbone_gradient_under_ddp_is_that_of_the_global_mean_loss(tmp_path, cache):
    """2 DDP ranks with half the batch each give the backbone the same gradient as one
    process with the whole batch (DDP averages; the trainer compensates)."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 112, 112, generator=gen), torch.randint(0, 32, (8,), generator=gen)
    overrides = tiny_overrides(tmp_path / "g", cache, "head.sample_rate=1.0", "model.options={dropout: 0.0}")
    single = run_distributed(_backbone_grads, 1, overrides, images, labels)[0]
    pair = run_distributed(_backbone_grads, 2, overrides, images, labels)
    torch.testing.assert_close(pair[0], pair[1])
    torch.testing.assert_close(pair[0], single, rtol=1e-4, atol=1e-5)  # fp32 summation order
