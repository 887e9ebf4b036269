"""Checkpoint atomicity, export tools, fine-tuning, non-finite steps (single process)."""

import os

import pytest
import torch

from partialfc.cli import main
from partialfc.train import checkpoint as ckpt
from partialfc.train.config import load_config
from tests.train_helpers import tiny_overrides


def test_a_crash_mid_write_leaves_no_valid_checkpoint(tmp_path):
    root = str(tmp_path / "checkpoints")
    ckpt.save_checkpoint(root, 1, {"step": 1}, {"weight": torch.zeros(2, 2)})

    def crash(directory):
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, {"step": 2}, {"weight": torch.ones(2, 2)}, write_extra=crash)
    assert ckpt.latest_checkpoint(root).endswith("step_00000001")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000001"]
    for step in (2, 3, 4):
        ckpt.save_checkpoint(root, step, {"step": step}, {"weight": torch.ones(2, 2)}, keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert ckpt.load_shared(ckpt.latest_checkpoint(root)) == {"step": 4}


def test_gather_rows_across_uneven_shards():
    full = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    shards = [(0, 3), (3, 2), (5, 2)]
    saved = [{"head": {"weight": full[lo:lo + n]}, "head_optimizer": {"momentum_buffer": -full[lo:lo + n]}}
             for lo, n in shards]
    saved[0]["head_optimizer"] = {}  # that shard's rows had no optimizer state yet: zeros
    rows = ckpt.gather_rows(saved.__getitem__, shards, 2, 4)
    assert torch.equal(rows["head"]["weight"], full[2:6])
    assert torch.equal(rows["head_optimizer"]["momentum_buffer"], torch.cat([torch.zeros(1, 3), -full[3:6]]))


def test_export_merge_finetune_and_eval(tmp_path, cache, capsys):
    from partialfc.train.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(run, cache, "train.max_steps=2")))
    trainer.train()
    latest = ckpt.latest_checkpoint(str(run / "checkpoints"))
    files = {name: torch.load(os.path.join(latest, name), weights_only=True) for name in os.listdir(latest)}
    assert sorted(files) == ["head_rank00000.pt", "order.pt", "trainer.pt"] and files["trainer.pt"]["format"] == 3
    assert files["order.pt"] == {"written": 1}  # the first checkpoint of the run
    assert torch.equal(files["head_rank00000.pt"]["rows"]["head"]["weight"], trainer.head.weight.detach())
    assert main(["export", "backbone", str(run), str(tmp_path / "bb.pt")]) == 0
    assert main(["export", "centres", str(run), str(tmp_path / "centres.pt")]) == 0
    centres = torch.load(tmp_path / "centres.pt")
    assert torch.equal(centres, trainer.head.weight.detach())  # one process owns every class
    bins = trainer.evaluator.sets[0].path
    assert main(["eval", "verify", "--checkpoint", str(tmp_path / "bb.pt"), "--bin", bins, "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert main(["eval", "verify", "--checkpoint", str(tmp_path / "nothing"), "--bin", bins]) == 2
    # fine-tune on a different class count from the exported backbone
    tuned = Trainer(load_config(None, tiny_overrides(tmp_path / "ft", cache, "train.max_steps=1",
                                                     f"checkpoint.init_backbone={tmp_path / 'bb.pt'}")))
    for key, value in trainer.engine.module.state_dict().items():
        assert torch.equal(value, tuned.engine.module.state_dict()[key]), key


def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path, cache):
    from partialfc.train.trainer import Trainer, TrainingDiverged

    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "nan", cache, "train.max_steps=6",
                                                       "train.max_consecutive_nonfinite=3")))
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    head_before = trainer.head.weight.detach().clone()
    hook = trainer.engine.module.register_forward_hook(lambda m, i, out: out * float("nan"))
    assert not trainer.train_step()["finite"]
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
    assert torch.equal(head_before, trainer.head.weight)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.train()
    hook.remove()
    assert ckpt.latest_checkpoint(str(tmp_path / "nan" / "checkpoints")).endswith("step_00000004")


def test_checkpoint_on_request_after_the_current_step(tmp_path, cache):
    import signal

    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "req", cache, "train.max_steps=3",
                                                       "eval.at_end=false")))
    original = signal.getsignal(signal.SIGUSR1)
    trainer.train_step()
    trainer.requests.request_checkpoint()  # what the SIGUSR1 handler installed by train() calls
    trainer.train()
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "req" / "checkpoints"))]
    assert names == ["step_00000002", "step_00000003"] and signal.getsignal(signal.SIGUSR1) == original


def test_retention_after_a_rollback_keeps_what_was_written_last(tmp_path):
    """Resumed from an earlier step in the same run dir: the new checkpoints survive
    ``keep`` and ``latest`` names them, not the abandoned higher steps. Every file gets the
    same mtime after each save, as on a file clock of a second with saves 2 ms apart."""
    from partialfc.train.checkpoint import TRAINER_FILE, latest_checkpoint, list_checkpoints, save_checkpoint

    root = str(tmp_path / "checkpoints")
    state = {"weight": torch.zeros(2, 3)}
    for step in (1000, 2000, 1100, 1200):
        save_checkpoint(root, step, {"step": step}, state, keep=2)
        for path in list_checkpoints(root):
            os.utime(os.path.join(path, TRAINER_FILE), ns=(1_700_000_000 * 10**9,) * 2)
    names = [os.path.basename(p) for p in list_checkpoints(root)]
    assert names == ["step_00001100", "step_00001200"]
    assert latest_checkpoint(root).endswith("step_00001200")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from partialfc.train.train_state import RngState

    np.random.standard_normal()  # leaves a cached gaussian in numpy's state,
    random.gauss(0.0, 1.0)  # and in python's

    def draws():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(),
                [random.gauss(0.0, 1.0) for _ in range(3)], random.random())

    rng = RngState(seed=0, rank=0)
    torch.save(rng.state_dict(), tmp_path / "rng.pt")
    expected = draws()
    rng.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_a_file_with_more_than_plain_values_is_refused(tmp_path):
    import numpy as np

    torch.save({"numpy": np.random.get_state()}, tmp_path / ckpt.TRAINER_FILE)
    with pytest.raises(ckpt.CheckpointError, match="plain values"):
        ckpt.load_shared(str(tmp_path))


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    from partialfc.train.state import check_compatible, read_shared

    cfg = load_config(None, ["run_dir=unused", "data.rec=unused"])
    meta = {"num_classes": 10,
            "model": {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size, "options": {}}}
    check_compatible(cfg, 10, meta, "ckpt")
    with pytest.raises(ckpt.CheckpointError, match="embedding_size"):
        check_compatible(cfg, 10, {**meta, "model": {**meta["model"], "embedding_size": 7}}, "ckpt")
    torch.save({"format": 1, "meta": meta}, tmp_path / ckpt.TRAINER_FILE)
    with pytest.raises(ckpt.CheckpointError, match="format 1, this version resumes formats 2 and 3"):
        read_shared(str(tmp_path))


def test_rows_for_a_rank_that_owns_no_class(tmp_path):
    from partialfc.train.state import gather_rows

    root = str(tmp_path / "checkpoints")
    shared = {"format": 3, "meta": {"row_shards": [(0, 1)]}}
    path = ckpt.save_checkpoint(root, 1, shared, {"local": {}, "rows": {"head": {"weight": torch.ones(1, 4)},
                                                                        "head_optimizer": {}}})
    rows = gather_rows(path, shared, start=1, count=0)
    assert rows["head"]["weight"].shape == (0, 4) and "head_optimizer" not in rows
