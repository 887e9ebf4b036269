"""Run-directory and wandb conventions of :class:`partialfc.train.logging.RunLogger`: one wandb
key per verification set, WANDB_* variables honoured for unset config keys, the user's wandb
settings left alone, ``config.yaml`` and ``training.log`` in the run directory. The offline
run is read back from wandb's own transaction log (records of ``wandb_internal_pb2.Record``)."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from types import SimpleNamespace

import pytest
import yaml

from partialfc.train.logging import RunLogger, read_metrics

try:
    from wandb.proto import wandb_internal_pb2
except ImportError:  # without the wandb extra, only the test that reads a run back cannot run
    wandb_internal_pb2 = None

DIRS = ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")
BLOCK, HEADER = 32768, 7  # LevelDB log blocks; record header: crc32 (4), length (2), type (1)


def read_wandb_records(path: str) -> list:
    """Every protobuf record of an offline ``.wandb`` file (file header ``:W&B``, magic, version;
    then LevelDB log blocks whose FULL/FIRST/MIDDLE/LAST chunks are joined)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if pos + HEADER + length > len(data):  # still being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: str, timeout: float = 300.0) -> list:
    """The records once the run's exit record is on disk: wandb's service process writes the
    log behind ``finish()``, as late as a loaded machine makes it."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"no exit record in {path} {timeout:.0f} s after finish(): {len(records)} records")
        time.sleep(0.1)


def history(records) -> dict:
    """``{key: [(step, value), ...]}`` over the history records."""
    out: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append((step, json.loads(item.value_json)))
    return out


def _logger(run_dir, mode=None, project=None, **config):
    cfg = SimpleNamespace(mode=mode, project=project, entity=None, name=None)
    return RunLogger(str(run_dir), "abcdef123456", cfg, {"run_dir": str(run_dir), "seed": 0, **config})


@pytest.mark.required  # CI installs the wandb extra: a skip there is a failure
def test_two_sets_keep_their_own_keys(tmp_path, monkeypatch):
    if wandb_internal_pb2 is None:
        pytest.skip("wandb is not installed: pip install 'partialfc[wandb]'")
    for var in (*DIRS, "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    logger = _logger(tmp_path, loss={"name": "cosface"})
    assert logger.wandb.settings.x_disable_stats is False  # system metrics on
    logger.log("train", 5, {"loss": 2.5, "epoch": 0.5})
    logger.log("eval", 5, {"set": "lfw.bin", "accuracy": 0.91, "tar_at_far_1e3": 0.5})
    logger.log("eval", 5, {"set": "cfp_fp.bin", "accuracy": 0.83, "tar_at_far_1e3": 0.4})
    logger.print("hello")
    logger.close()
    assert not [v for v in DIRS if v in os.environ]  # the user's wandb settings and caches stay where they were

    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-abcdef123456.wandb"))
    assert len(files) == 1
    records = finished_records(files[0])
    keys = history(records)
    assert keys["eval/lfw/accuracy"] == [(5, 0.91)] and keys["eval/cfp_fp/accuracy"] == [(5, 0.83)]
    assert keys["eval/lfw/tar_at_far_1e3"] == [(5, 0.5)] and keys["train/loss"] == [(5, 2.5)]
    assert not any(k.startswith("eval/accuracy") for k in keys)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "from-env" and runs[0].run_id == "abcdef123456"

    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "run_dir": str(tmp_path), "seed": 0, "loss": {"name": "cosface"}}
    assert (tmp_path / "training.log").read_text().rstrip().endswith(" hello")
    assert [r["set"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "eval"] == \
        ["lfw.bin", "cfp_fp.bin"]


def test_config_overrides_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # would need an account: the config's mode wins
    logger = _logger(tmp_path, mode="disabled")
    assert logger.wandb is None
    logger.close()
    assert not (tmp_path / "wandb").exists() and (tmp_path / "config.yaml").exists()


def test_environment_disables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = _logger(tmp_path)
    assert logger.wandb is None
    logger.close()


def test_a_resume_drops_a_torn_last_record(tmp_path):
    """A run that died while appending a record (disk full, killed) left half a line: the
    resumed run keeps the whole records up to its checkpoint and goes on."""
    whole = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(whole) + '{"kind": "train", "st')
    cfg = SimpleNamespace(mode="disabled", project=None, entity=None, name=None)
    logger = RunLogger(str(tmp_path), "abcdef123456", cfg, {"run_dir": str(tmp_path)}, resume_step=2)
    logger.log("train", 3, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [
        (1, 1.0), (2, 1.0), (3, 0.5)]
