"""Data from strangers and at scale (issue 15): an undecodable image during training, labels that
would blow up the class count, packing what cannot be decoded, a write killed between the
``.rec`` and the ``.idx``, the label cache, and config paths given relative to where the user
stood. Files are written by hand (tests/data_helpers.py) or by real subprocesses."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from partialfc.cli import main
from partialfc.data.dataset_index import MAX_CLASSES, open_dataset
from partialfc.data.recordio import RecordIOError, read_index
from partialfc.data.torch_loader import TorchLoader
from partialfc.errors import PartialFCError
from tests.data_helpers import (hand_image_payload, jpeg_bytes, smooth_image, write_hand_rec,
                                write_unique_label_dataset)

REPO = Path(__file__).resolve().parents[1]


def write_with_bad(prefix, n: int, bad: tuple[int, ...]) -> str:
    """Plain dataset of ``n`` 112 px JPEGs, record ``k`` labelled ``k % 8``; the records in
    ``bad`` hold a JPEG cut after 200 bytes and followed by noise (Pillow cannot decode it)."""
    records = []
    for k in range(n):
        image = jpeg_bytes(smooth_image(k))
        if k in bad:
            image = image[:200] + np.random.default_rng(k).bytes(300)
        records.append((k, hand_image_payload(k % 8, image, key=k)))
    write_hand_rec(prefix, records)
    return str(prefix)


def labels_of(loader) -> list[list[int]]:
    return [lab.tolist() for _, lab in loader]


# ---- defect 3: an undecodable image in the middle of an epoch ---------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_in_error_mode_is_one_line_naming_the_record(tmp_path, workers):
    prefix = write_with_bad(tmp_path / "c", 40, bad=(21,))
    loader = TorchLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False, num_workers=workers)
    with pytest.raises(RecordIOError) as err:
        labels_of(loader)
    message = str(err.value)
    assert "\n" not in message and "c.rec: record 21" in message and "data.on_bad_image=skip" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_in_skip_mode_is_replaced_by_the_next_good_record_and_counted(tmp_path, workers, caplog):
    prefix = write_with_bad(tmp_path / "c", 40, bad=(21, 22))
    loader = TorchLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False, flip=False,
                         num_workers=workers, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        epoch = labels_of(loader)
    expected = [k % 8 for k in range(40)]
    expected[21] = expected[22] = 23 % 8  # both replaced by record 23, the next decodable one
    assert sum(epoch, []) == expected
    assert loader.bad_records == {21: loader.bad_records[21], 22: loader.bad_records[22]}
    assert "record 21" in loader.bad_records[21]
    assert "epoch 0: 2 bad image(s) replaced" in caplog.text and "21, 22" in caplog.text
    state = loader.state_dict()
    assert state["bad_records"] == [21, 22]
    again = TorchLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False, flip=False,
                        num_workers=0, on_bad_image="skip")
    again.load_state_dict(state)
    assert sorted(again.bad_records) == [21, 22]  # the budget counts across a resume


def test_bad_image_budget_stops_with_the_list(tmp_path):
    prefix = write_with_bad(tmp_path / "c", 40, bad=(3, 17, 30))
    loader = TorchLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False, num_workers=0,
                         on_bad_image="skip", bad_image_budget=2)
    with pytest.raises(RecordIOError) as err:
        labels_of(loader)
    message = str(err.value)
    assert "\n" not in message and "data.bad_image_budget=2" in message
    assert "3, 17, 30" in message


@pytest.mark.required  # CI installs DALI: a skip there is a failure
def test_dali_skip_mode_leaves_bad_records_out_and_counts_them(tmp_path):
    pytest.importorskip("nvidia.dali")
    from partialfc.data.dali_loader import DaliLoader

    prefix = write_with_bad(tmp_path / "c", 40, bad=(21,))
    with pytest.raises(RecordIOError, match=r"c\.rec: record 21.*data\.on_bad_image=skip"):
        labels_of(DaliLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False))
    loader = DaliLoader(prefix, 8, rank=0, world_size=1, device="cpu", shuffle=False, drop_last=False,
                        on_bad_image="skip")
    assert sorted(sum(labels_of(loader), [])) == sorted(k % 8 for k in range(40) if k != 21)
    assert list(loader.bad_records) == [21] and loader.state_dict()["bad_records"] == [21]
    with pytest.raises(RecordIOError, match="data.bad_image_budget=0"):
        DaliLoader(prefix, 8, rank=0, world_size=1, device="cpu", on_bad_image="skip", bad_image_budget=0)


def _train_argv(prefix, run_dir, *extra) -> list[str]:
    config = Path(run_dir).with_suffix(".yaml")
    config.write_text(f"run_dir: {run_dir}\n")
    return ["train", str(config), f"data.rec={prefix}", "data.batch_size=8", "data.num_workers=1",
            "data.shuffle=false", "model.backbone=iresnet_tiny", "model.embedding_size=16", "loss.name=cosface",
            "train.max_steps=6", "log.every_steps=1", "log.wandb.mode=disabled", "log.plot=false",
            "eval.every_steps=0", "eval.at_end=false", "checkpoint.every_steps=0", *extra]


@pytest.mark.multiprocess
def test_training_over_a_bad_image(tmp_path):
    """A .rec with a corrupt JPEG in the middle of the first epoch, through ``partialfc train``."""
    prefix = write_with_bad(tmp_path / "c", 40, bad=(21,))
    script = Path(sys.executable).with_name("partialfc")
    done = subprocess.run([str(script), *_train_argv(prefix, tmp_path / "r1")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "c.rec: record 21" in last and "on_bad_image=skip" in last
    assert "Traceback" not in done.stderr
    done = subprocess.run([str(script), *_train_argv(prefix, tmp_path / "r2", "data.on_bad_image=skip")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "1 bad image(s) replaced" in log and "21" in log


# ---- defect 6: labels that would make absurd class counts; NaN / inf labels ------------------

def _plain(prefix, labels) -> str:
    write_hand_rec(prefix, [(k, hand_image_payload(v, b"img", key=k)) for k, v in enumerate(labels)])
    return str(prefix)


@pytest.mark.parametrize("outlier", [1_000_000, 3_000_000_000])
def test_a_sparse_outlier_label_is_an_error_naming_the_record(tmp_path, outlier):
    labels = [k % 50 for k in range(200)]
    labels[77] = outlier
    prefix = _plain(tmp_path / "p", labels)
    with pytest.raises(RecordIOError) as err:
        open_dataset(prefix)
    assert f"record 77" in str(err.value) and str(outlier) in str(err.value)
    assert "\n" not in str(err.value)
    if outlier < MAX_CLASSES:
        stated = open_dataset(prefix, num_classes=outlier + 1)  # a stated count accepts sparse labels
        assert stated.num_classes == outlier + 1
    with pytest.raises(RecordIOError, match=f"record 77.*label {outlier}"):
        open_dataset(prefix, num_classes=min(outlier, MAX_CLASSES))


def test_labels_above_the_stated_maximum_are_refused(tmp_path):
    prefix = _plain(tmp_path / "p", [0, 1, 2])
    with pytest.raises(RecordIOError, match=f"at most {MAX_CLASSES}"):
        open_dataset(prefix, num_classes=MAX_CLASSES + 1)


def test_nan_and_inf_labels_are_bad_records(tmp_path, capsys):
    labels = [float(k % 4) for k in range(12)]
    labels[3], labels[8] = math.nan, math.inf
    prefix = _plain(tmp_path / "p", labels)
    with pytest.raises(RecordIOError, match="record 3"):
        open_dataset(prefix)
    assert main(["data", "check", prefix, "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "record 3" in out and "record 8" in out and "2 bad record(s)" in out


# ---- 9/10: pack verifies, the pair is written atomically, check rejects what training rejects ------

def _folders(root, truncate: str | None = None):
    for ident in range(3):
        (root / f"id{ident}").mkdir(parents=True)
        for i in range(2):
            path = root / f"id{ident}" / f"{i}.jpg"
            data = jpeg_bytes(smooth_image(10 * ident + i))
            path.write_bytes(data[:len(data) // 2] if path.relative_to(root).as_posix() == truncate else data)


def test_pack_refuses_a_truncated_jpeg_or_skips_and_lists_it(tmp_path, capsys):
    _folders(tmp_path / "src", truncate="id1/0.jpg")
    assert main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and "id1/0.jpg: cannot be decoded" in error and "--skip-bad" in error
    assert not os.path.exists(tmp_path / "out.rec")
    assert main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "packed 5 images of 3 identities" in out and "skipped 1 bad file(s)" in out and "id1/0.jpg" in out
    ds = open_dataset(tmp_path / "out")
    assert ds.labels.tolist() == [0, 0, 1, 2, 2] and ds.num_classes == 3


def test_check_rejects_images_training_rejects(tmp_path, capsys):
    small = jpeg_bytes(smooth_image(1, size=96))  # decodes, but training wants 112x112
    records = [(k, hand_image_payload(k, jpeg_bytes(smooth_image(k)), key=k)) for k in range(4)]
    records[2] = (2, hand_image_payload(2, small, key=2))
    write_hand_rec(tmp_path / "s", records)
    assert main(["data", "check", str(tmp_path / "s")]) == 1
    assert "record 2" in capsys.readouterr().out
    with pytest.raises(RecordIOError, match="record 2.*96x96"):
        labels_of(TorchLoader(str(tmp_path / "s"), 4, rank=0, world_size=1, device="cpu", num_workers=0))


KILL_BETWEEN_RENAMES = """
import os, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if dst.endswith(".rec"):
        os._exit(9)  # killed right after the .rec was renamed, before the .idx
os.replace = replace
from partialfc.data.tools import shuffle_dataset
shuffle_dataset(sys.argv[1], sys.argv[2], seed=1, progress=False)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("in_place", [False, True])
def test_shuffle_killed_between_rec_and_idx_keeps_a_valid_pair(tmp_path, in_place):
    prefix = str(tmp_path / "u")
    write_unique_label_dataset(prefix, 30)
    out = prefix if in_place else str(tmp_path / "s")
    if not in_place:
        write_unique_label_dataset(out, 12)  # an older dataset under the output name
    done = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, prefix, out], cwd=REPO, timeout=120)
    assert done.returncode == 9
    ds = open_dataset(out)  # a consistent pair: the new one, completed when opened
    assert sorted(ds.labels.tolist()) == list(range(30)) and ds.labels.tolist() != list(range(30))
    loader = TorchLoader(ds, 10, rank=0, world_size=1, device="cpu", shuffle=False, num_workers=0)
    assert sorted(sum(labels_of(loader), [])) == list(range(30))  # every image decodes
    assert not any(p.name.endswith((".tmp", ".pending")) for p in tmp_path.iterdir())


# ---- 11: labels cached next to the index ------------------------------------------------------

def test_label_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    import partialfc.data.dataset_index as di
    prefix = str(tmp_path / "u")
    write_unique_label_dataset(prefix, 20)
    first = open_dataset(prefix)
    cache = Path(prefix + ".idx.labels.npz")
    assert cache.exists()
    monkeypatch.setattr(di, "_scan_labels", lambda *a: pytest.fail("labels read again despite the cache"))
    again = open_dataset(prefix)
    for name in ("keys", "offsets", "labels"):
        assert np.array_equal(getattr(again, name), getattr(first, name))
    assert (again.flavour, again.num_classes) == (first.flavour, first.num_classes)
    monkeypatch.undo()
    write_unique_label_dataset(prefix, 25)  # the dataset changes: the cache no longer fits
    assert open_dataset(prefix).num_images == 25
    cache.write_bytes(b"garbage")  # a damaged cache is ignored and rewritten
    assert open_dataset(prefix).num_images == 25 and np.load(cache)["labels"].shape == (25,)


def test_a_label_cache_that_cannot_be_written_is_skipped(tmp_path):
    prefix = str(tmp_path / "u")
    write_unique_label_dataset(prefix, 10)
    os.makedirs(prefix + ".idx.labels.npz")  # in the way of the cache, even for root
    assert open_dataset(prefix).num_images == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.idx", "u.idx.labels.npz", "u.rec"]


# ---- 9: config paths resolve where the user stood ---------------------------------------------

def test_config_paths_are_absolute_from_where_the_user_stood(tmp_path, monkeypatch):
    from partialfc.train.config import load_config
    user = tmp_path / "me"
    (user / "cfg").mkdir(parents=True)
    (user / "cfg" / "c.yaml").write_text("run_dir: runs/x\ndata:\n  rec: packed/faces\neval:\n  bins: [b/lfw.bin]\n")
    monkeypatch.chdir(user)
    cfg = load_config("cfg/c.yaml", ["checkpoint.init_backbone=w/bb.pt", "checkpoint.resume=old/ckpt"], cwd=user)
    assert cfg.run_dir == str(user / "runs/x") and cfg.data.rec == str(user / "packed/faces")
    assert list(cfg.eval.bins) == [str(user / "b/lfw.bin")] and cfg.data.cache_dir == str(user / "runs/data")
    assert cfg.checkpoint.init_backbone == str(user / "w/bb.pt")
    assert cfg.checkpoint.resume == str(user / "old/ckpt")
    assert load_config("cfg/c.yaml", ["checkpoint.resume=auto"], cwd=user).checkpoint.resume == "auto"
    monkeypatch.chdir(tmp_path)  # loaded from elsewhere: absolute paths stay, relative ones follow cwd
    cfg = load_config(user / "cfg" / "c.yaml", [f"data.rec={user}/d"], cwd=tmp_path)
    assert cfg.data.rec == f"{user}/d" and cfg.run_dir == str(tmp_path / "runs/x")
    assert load_config("me/cfg/c.yaml").run_dir == "runs/x"  # without cwd: as written
    search = ["loss.name=search_softmax", "search.enabled=true", "search.reward=b/reward.bin"]
    assert load_config(user / "cfg" / "c.yaml", search, cwd=user).search.reward == str(user / "b/reward.bin")


def test_submit_script_runs_where_the_user_stood(tmp_path, monkeypatch, capsys):
    user = tmp_path / "me"
    user.mkdir()
    (user / "c.yaml").write_text("run_dir: runs/x\ndata:\n  rec: packed/faces\n")
    monkeypatch.chdir(user)
    assert main(["submit", "c.yaml", "data.rec=other/faces", "--gpus-per-node", "1", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert f"\ncd {user}  # " in script  # relative paths of the config and the overrides resolve there
    assert f"{REPO}/slurm/preemptible.sh" in script


@pytest.mark.parametrize("script,venv", [("torchrun.sh", "$REPO/.venv/bin/python"),
                                         ("deepspeed.sh", "$REPO/.venv/bin/deepspeed")])
def test_launch_scripts_keep_the_callers_directory(script, venv):
    text = (REPO / "launch" / script).read_text()
    assert "\ncd " not in text and venv in text
