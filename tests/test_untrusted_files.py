"""Files from disk run no code: a ``.bin`` or a backbone/checkpoint file whose pickle carries
a ``__reduce__`` payload is refused with one ``error: ...`` line naming the file (exit 2)
through every command that reads one, and the payload never runs."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from partialfc.cli import main
from partialfc.data.verification_bin import read_bin, write_bin
from partialfc.errors import VerificationBinError
from partialfc.eval.export import write_exported
from partialfc.models import build_backbone
from partialfc.train import checkpoint as ckpt
from partialfc.train.config import load_config
from tests.train_helpers import tiny_overrides


class Payload:
    """Unpickling this creates ``marker`` (an ``os.mkdir`` call)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def hostile_bin(path: Path, marker: Path) -> str:
    with open(path, "wb") as f:
        pickle.dump(([b"\xff\xd8", Payload(marker)], [True]), f, protocol=4)
    return str(path)


def hostile_torch_file(path: Path, marker: Path, record: dict) -> str:
    """A ``torch.save`` of ``record`` with the payload in it (torch.load(weights_only=False)
    would run it)."""
    torch.save({**record, "extra": Payload(marker)}, path)
    return str(path)


def tiny_record() -> dict:
    model = build_backbone("iresnet_tiny", 32)
    return {"backbone": "iresnet_tiny", "embedding_size": 32, "options": {}, "state_dict": model.state_dict()}


def run_cli(argv: list[str], capsys) -> str:
    """The one stderr line of a user error (exit 2, nothing on stdout)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """The fixture is a real attack: an unrestricted load runs it."""
    marker = tmp_path / "ran"
    with open(hostile_bin(tmp_path / "x.bin", marker), "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ----------------------------------------------------------------- .bin reader


def test_bin_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = hostile_bin(tmp_path / "evil.bin", marker)
    with pytest.raises(VerificationBinError, match=rf"evil\.bin .*refers to {os.mkdir.__module__}\.mkdir "):
        read_bin(path)
    assert not marker.exists()


def _python2_pickle() -> bytes:
    """What Python 2's ``pickle.dump((bins, issame), f, 2)`` wrote: str images as
    SHORT_BINSTRING, numpy arrays rebuilt from ``numpy.core.multiarray._reconstruct``."""
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87R"
             b"(K\x01K\x02\x85cnumpy\ndtype\nq\x03U\x02u1K\x00K\x01\x87Rq\x04(K\x03U\x01|NNNJ\xff\xff\xff\xff"
             b"J\xff\xff\xff\xffK\x00tb\x89U\x02GHtb")
    return b"\x80\x02]q\x00(U\x03abcU\x02DE" + array + b"U\x01fe]q\x05(\x88\x89e\x86q\x06."


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_files_as_insightface_wrote_them_still_load(tmp_path, protocol):
    images = [b"abc", np.frombuffer(b"DE", np.uint8), np.frombuffer(b"GH", np.uint8), b"f"]
    for issame in ([True, False], np.array([True, False]), [np.bool_(True), np.bool_(False)]):
        with open(tmp_path / "s.bin", "wb") as f:
            pickle.dump((images, issame), f, protocol=protocol)
        got, same = read_bin(tmp_path / "s.bin")
        assert got == [b"abc", b"DE", b"GH", b"f"] and same.dtype == bool and same.tolist() == [True, False]
    (tmp_path / "py2.bin").write_bytes(_python2_pickle())
    got, same = read_bin(tmp_path / "py2.bin")
    assert got == [b"abc", b"DE", b"GH", b"f"] and same.tolist() == [True, False]
    write_bin(tmp_path / "w.bin", [b"a", b"b"], [True])
    assert read_bin(tmp_path / "w.bin")[0] == [b"a", b"b"]


@pytest.mark.parametrize("content", [
    pickle.dumps(([b"a", b"b"], [np.float64(1.0)])),  # a numpy scalar of another dtype
    pickle.dumps(([np.zeros(2, np.float32), b"b"], [True])),  # float array as an image
    pickle.dumps(([b"a", b"b"], [True]))[:-7],  # truncated
    pickle.dumps({"bins": [b"a", b"b"]}),  # another structure
    pickle.dumps(([b"a", b"b"], [1.5])),
    b"",
])
def test_bin_content_other_than_bytes_and_booleans_is_an_error_naming_the_file(tmp_path, content):
    (tmp_path / "odd.bin").write_bytes(content)
    with pytest.raises(VerificationBinError, match="odd.bin"):
        read_bin(tmp_path / "odd.bin")


# ----------------------------------------------------------------- through the commands


@pytest.fixture
def backbone_file(tmp_path) -> str:
    path = tmp_path / "bb.pt"
    write_exported(tiny_record(), str(path))
    return str(path)


def test_eval_verify_refuses_a_hostile_bin(tmp_path, backbone_file, capsys):
    marker = tmp_path / "ran"
    err = run_cli(["eval", "verify", "--checkpoint", backbone_file, "--bin", hostile_bin(tmp_path / "e.bin", marker)],
                  capsys)
    assert "e.bin" in err and not marker.exists()


def test_every_backbone_reader_refuses_a_hostile_file(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = hostile_torch_file(tmp_path / "evil.pt", marker, tiny_record())
    bins = tmp_path / "v.bin"
    write_bin(bins, [b"a", b"b"], [True])
    for argv in (["eval", "verify", "--checkpoint", evil, "--bin", str(bins)],
                 ["export", "backbone", evil, str(tmp_path / "out.pt")],
                 ["export", "safetensors", evil, str(tmp_path / "out.safetensors")]):
        err = run_cli(argv, capsys)
        assert "evil.pt" in err and "posix.mkdir" in err, err
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def _hostile_checkpoint(tmp_path: Path, marker: Path, which: str) -> Path:
    """A run directory whose latest checkpoint has the payload in ``which``."""
    root = tmp_path / "run" / "checkpoints"
    shared = {"format": 3, "meta": {"num_classes": 2, "world_size": 1, "row_shards": [(0, 2)]},
              "state": {"progress": {"step": 1}}}
    ckpt.save_checkpoint(str(root), 1, shared, {"local": {}, "rows": {"head": {"weight": torch.zeros(2, 4)}}})
    hostile_torch_file(root / ckpt.step_name(1) / which, marker, shared)
    return tmp_path / "run"


@pytest.mark.parametrize("which", [ckpt.TRAINER_FILE, ckpt.head_file(0)])
def test_export_centres_refuses_a_hostile_checkpoint(tmp_path, capsys, which):
    marker = tmp_path / "ran"
    run = _hostile_checkpoint(tmp_path, marker, which)
    err = run_cli(["export", "centres", str(run), str(tmp_path / "c.pt")], capsys)
    assert which in err and not marker.exists()


def test_training_refuses_hostile_files(tmp_path, cache, capsys):
    marker = tmp_path / "ran"
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    evil = hostile_torch_file(tmp_path / "evil.pt", marker, tiny_record())
    run = _hostile_checkpoint(tmp_path, marker, ckpt.TRAINER_FILE)
    evil_bin = hostile_bin(tmp_path / "evil.bin", marker)
    for extra, name in ((f"checkpoint.init_backbone={evil}", "evil.pt"),
                        (f"checkpoint.resume={run}", ckpt.TRAINER_FILE),
                        (f"eval.bins=[{evil_bin}]", "evil.bin")):
        err = run_cli(["train", str(config), *tiny_overrides(tmp_path / "r", cache, extra)], capsys)
        assert name in err, err
    assert not marker.exists()


def test_resume_auto_from_a_hostile_run_dir(tmp_path, cache, capsys):
    """``checkpoint.resume=auto`` on a run directory holding a hostile checkpoint."""
    marker = tmp_path / "ran"
    run = _hostile_checkpoint(tmp_path, marker, ckpt.TRAINER_FILE)
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    err = run_cli(["train", str(config), *tiny_overrides(run, cache)], capsys)
    assert ckpt.TRAINER_FILE in err and not marker.exists()


@pytest.mark.parametrize("pointer", ["../elsewhere", "{tmp}/elsewhere", "step_00000001/../../elsewhere", ""])
def test_a_latest_pointer_leaving_the_run_directory_is_refused(tmp_path, pointer):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(str(root), 1, {"step": 1}, {"w": torch.zeros(1)})
    (tmp_path / "elsewhere").mkdir()
    torch.save({"step": 99}, tmp_path / "elsewhere" / ckpt.TRAINER_FILE)
    (root / ckpt.LATEST).write_text(pointer.format(tmp=tmp_path) + "\n")
    with pytest.raises(ckpt.CheckpointError, match="latest"):
        ckpt.latest_checkpoint(str(root))


def test_a_torch_zip_with_a_hostile_data_pickle_is_refused(tmp_path):
    """The payload hidden in a valid torch zip next to real tensors (what a tampered export
    looks like): read_exported names the file."""
    from partialfc.errors import PartialFCError
    from partialfc.eval.export import read_exported

    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(tiny_record(), buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(tmp_path / "t.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(Payload(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(PartialFCError, match="t.pt"):
        read_exported(str(tmp_path / "t.pt"))
    assert not marker.exists()


# ----------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("which", [ckpt.TRAINER_FILE, ckpt.head_file(1)])
def test_a_truncated_file_falls_back_to_the_previous_checkpoint(tmp_path, caplog, which):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_checkpoint(str(root), step, {"step": step}, {"w": torch.full((64,), float(step))})
        torch.save({"w": torch.zeros(64)}, root / ckpt.step_name(step) / ckpt.head_file(1))  # a second rank's
    _truncate(root / ckpt.step_name(2) / which)
    with caplog.at_level("WARNING"):
        found = ckpt.latest_checkpoint(str(root))
    assert found == str(root / ckpt.step_name(1)) and ckpt.load_shared(found) == {"step": 1}
    assert f"{root / ckpt.step_name(2) / which}" in caplog.text and ckpt.step_name(1) in caplog.text
    _truncate(root / ckpt.step_name(1) / which, 0.0)
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.step_name(2)}/{which}"):
        ckpt.latest_checkpoint(str(root))


def test_resume_and_export_skip_a_truncated_shard(tmp_path, cache, capsys):
    from partialfc.train.trainer import Trainer

    run = tmp_path / "run"
    overrides = tiny_overrides(run, cache, "train.max_steps=4", "checkpoint.every_steps=2", "eval.at_end=false")
    Trainer(load_config(None, overrides)).train()
    _truncate(run / "checkpoints" / ckpt.step_name(4) / ckpt.head_file(0))
    assert main(["export", "centres", str(run), str(tmp_path / "c.pt")]) == 0
    resumed = Trainer(load_config(None, overrides))
    assert resumed.step == 2
    resumed.train()
    assert ckpt.load_shared(ckpt.latest_checkpoint(str(run / "checkpoints")))["state"]["progress"]["step"] == 4


# ----------------------------------------------------------------- disk full


def _disk_full_after(monkeypatch, files: int) -> None:
    """``torch.save`` writes ``files`` files, then half of the next one and fails with ENOSPC."""
    import errno

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= files:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("files", [0, 1, 2])  # the rank's file, trainer.pt, or order.pt
def test_disk_full_while_checkpointing(tmp_path, monkeypatch, files):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(str(root), 1, {"step": 1}, {"w": torch.zeros(2)})
    _disk_full_after(monkeypatch, files)
    with pytest.raises(ckpt.CheckpointError, match=f"{root}.*No space left on device"):
        ckpt.save_checkpoint(str(root), 2, {"step": 2}, {"w": torch.ones(2)})
    assert sorted(os.listdir(root)) == [ckpt.LATEST, ckpt.step_name(1)]
    assert ckpt.load_shared(ckpt.latest_checkpoint(str(root))) == {"step": 1}


def test_disk_full_during_training_is_one_line(tmp_path, cache, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    _disk_full_after(monkeypatch, 3)  # the checkpoint at step 2 (three files), then the one at step 4
    err = run_cli(["train", str(config), *tiny_overrides(tmp_path / "run", cache, "train.max_steps=4",
                                                         "checkpoint.every_steps=2", "eval.at_end=false")], capsys)
    root = tmp_path / "run" / "checkpoints"
    assert f"{root}" in err and "No space left on device" in err
    assert sorted(os.listdir(root)) == [ckpt.LATEST, ckpt.step_name(2)]


def _one_rank_out_of_space(rank, world_size, root):
    """Rank 1's write fails: every rank gets the error, nobody waits for ever."""
    import errno

    from partialfc.train import checkpoint as ckpt_module

    ckpt_module.save_checkpoint(root, 1, {"step": 1}, {"w": torch.zeros(2)})
    if rank == 1:
        def full(obj, path):
            raise OSError(errno.ENOSPC, "No space left on device")
        ckpt_module._save = full
    try:
        ckpt_module.save_checkpoint(root, 2, {"step": 2}, {"w": torch.ones(2)})
    except ckpt_module.CheckpointError as err:
        return str(err)
    return None


@pytest.mark.multiprocess
@pytest.mark.required
def test_disk_full_on_one_rank_fails_every_rank(tmp_path):
    from partialfc.testing.multiprocess import run_distributed

    root = str(tmp_path / "checkpoints")
    errors = run_distributed(_one_rank_out_of_space, 2, root, timeout=120)
    assert "No space left on device" in errors[1] and "another rank" in errors[0]
    assert all(root in e for e in errors)
    assert sorted(os.listdir(root)) == [ckpt.LATEST, ckpt.step_name(1)]
