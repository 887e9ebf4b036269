"""The first start of a multi-rank job reads the record headers once, on rank 0 (issue 21).

Real gloo ranks (``run_distributed``) open a real ``.rec``/``.idx`` pair written by hand
(``tests/data_helpers.py``, from the format description) through
``open_dataset(..., distributed=True)``, what the trainer does. A scan is counted by wrapping
``dataset_index._scan_labels`` in each rank; the reference labels are the ones written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
import torch.distributed as dist

from partialfc.data import dataset_index as di
from partialfc.errors import InputNotFoundError, RecordIOError
from partialfc.testing import reserved_port, run_distributed
from tests.data_helpers import hand_image_payload, write_hand_rec

pytestmark = [pytest.mark.multiprocess, pytest.mark.required]
N, CLASSES, RECORD_BYTES = 3000, 50, 32  # a record: 8-byte frame + 24-byte IRHeader, no image bytes


def labels_written(n: int = N) -> np.ndarray:
    return (np.arange(n) * 7) % CLASSES


def write_dataset(folder, n: int = N) -> str:
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "d")
    write_hand_rec(prefix, [(k, hand_image_payload(float(label), b"", key=k))
                            for k, label in enumerate(labels_written(n))])
    return prefix


def hand_index(prefix: str) -> tuple[list[int], list[int]]:
    """(keys, offsets) read from the ``.idx`` text: one ``key<TAB>offset`` line per record."""
    with open(prefix + ".idx") as f:
        pairs = [tuple(map(int, line.split("\t"))) for line in f]
    return [k for k, _ in pairs], [o for _, o in pairs]


def _open_counting(rank, prefix, **kw):
    """``open_dataset(prefix, distributed=True)`` on this rank: (scans here, dataset or error message)."""
    scans = []
    scan = di._scan_labels
    di._scan_labels = lambda *a: scans.append(rank) or scan(*a)
    try:
        outcome = di.open_dataset(prefix, distributed=True, progress=False, **kw)
    except (RecordIOError, InputNotFoundError) as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        di._scan_labels = scan
    return len(scans), outcome


def _start(rank, world_size, prefix):
    scans, ds = _open_counting(rank, prefix)
    return scans, ds.labels, ds.keys.tolist(), ds.offsets.tolist(), ds.num_classes, ds.flavour


def _check_start(results, prefix, scans_expected):
    keys, offsets = hand_index(prefix)
    assert [r[0] for r in results] == scans_expected
    for _, labels, got_keys, got_offsets, classes, flavour in results:
        assert labels.dtype == np.int64 and np.array_equal(labels, labels_written())
        assert (got_keys, got_offsets, classes, flavour) == (keys, offsets, CLASSES, di.PLAIN)


def test_first_start_scans_on_rank_zero_only_and_later_starts_nowhere(tmp_path):
    prefix = write_dataset(tmp_path)
    sidecar = prefix + ".idx.labels.npz"
    _check_start(run_distributed(_start, 4, prefix, timeout=120), prefix, [1, 0, 0, 0])
    assert os.path.exists(sidecar) and np.array_equal(np.load(sidecar)["labels"], labels_written())
    _check_start(run_distributed(_start, 4, prefix, timeout=120), prefix, [0, 0, 0, 0])  # every rank: the cache


@contextmanager
def read_only(folder):
    """``folder`` unwritable, also for root (``chattr +i`` where mode bits do not bind); skip where impossible."""
    os.chmod(folder, 0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK) and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        probe = os.path.join(folder, "probe")
        try:
            open(probe, "w").close()
            os.remove(probe)
            pytest.skip("cannot make a folder read-only here")
        except OSError:
            pass
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def test_a_read_only_dataset_folder_starts_with_one_scan_and_no_sidecar(tmp_path):
    prefix = write_dataset(tmp_path)
    with read_only(tmp_path):
        _check_start(run_distributed(_start, 4, prefix, timeout=120), prefix, [1, 0, 0, 0])
    assert not os.path.exists(prefix + ".idx.labels.npz")
    assert sorted(os.listdir(tmp_path)) == ["d.idx", "d.rec"]  # no temporary file left either


def _failures(rank, world_size, corrupt, missing_on_two, other_size_on_one):
    """The open of three broken setups on every rank, and a skip-mode open of the corrupt one."""
    outcomes = [_open_counting(rank, corrupt)[1],
                _open_counting(rank, missing_on_two if rank == 2 else corrupt)[1],
                _open_counting(rank, other_size_on_one if rank == 1 else corrupt)[1]]
    scans, ds = _open_counting(rank, corrupt, on_error="skip")
    return outcomes, scans, ds.labels, ds.skipped


def test_a_bad_record_or_a_rank_missing_the_files_fails_every_rank_with_one_message(tmp_path):
    corrupt = write_dataset(tmp_path / "c")
    bad = N // 2
    with open(corrupt + ".rec", "r+b") as f:  # the magic of the record in the middle
        f.seek(RECORD_BYTES * bad)
        f.write(b"\0\0\0\0")
    other = write_dataset(tmp_path / "o", N - 1)
    results = run_distributed(_failures, 4, corrupt, str(tmp_path / "absent"), other, timeout=120)
    outcomes = [r[0] for r in results]
    for case, kind in enumerate(["RecordIOError", "InputNotFoundError"]):
        messages = {o[case] for o in outcomes}
        assert len(messages) == 1, messages  # the same message on every rank: none went on, none hung
        message = messages.pop()
        assert isinstance(message, str) and message.startswith(kind + ": ") and "\n" not in message
    assert f"record {bad} " in outcomes[0][0] and "absent" in outcomes[0][1]
    for rank, outcome in enumerate(outcomes):  # each rank names its own files, and the ranks that differ
        assert outcome[2].startswith(f"RecordIOError: {other if rank == 1 else corrupt}.rec: ranks [1] see ")
    assert [r[1] for r in results] == [1, 0, 0, 0]  # skip mode: rank 0 reads, the others receive
    expected = np.delete(labels_written(), bad)
    for _, _, labels, skipped in results:
        assert np.array_equal(labels, expected) and [k for k, _ in skipped] == [bad]
    assert not os.path.exists(corrupt + ".idx.labels.npz")  # a skipping open caches nothing


def _slow_scan_short_timeout(rank, world_size, port, prefix):
    """A 2 s process-group timeout and a scan of 4 s on rank 0: the others wait in heartbeats."""
    dist.destroy_process_group()
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=2))
    di.HEARTBEAT_S = 0.25
    scan = di._scan_labels

    def slow(*a):
        import time

        time.sleep(4)
        return scan(*a)

    di._scan_labels = slow
    return di.open_dataset(prefix, distributed=True, progress=False).labels


def test_a_scan_longer_than_the_collective_timeout_times_no_rank_out(tmp_path):
    prefix = write_dataset(tmp_path, 100)
    with reserved_port() as port:
        for labels in run_distributed(_slow_scan_short_timeout, 2, port, prefix, timeout=120):
            assert np.array_equal(labels, labels_written(100))


SYNTHETIC = ["data.synthetic.num_identities=6", "data.synthetic.images_per_identity=4",
             "data.synthetic.verification_identities=2", "data.synthetic.verification_pairs=4",
             "data.batch_size=3", "data.num_workers=0"]


def _builders(rank, world_size, cache_dir):
    """What the trainer builds from ``cfg.data`` and ``cfg.eval.bins`` on this rank."""
    import torch

    from partialfc.train.config import load_config
    from partialfc.train.data import build_loader, prepare_dataset

    cfg = load_config(None, [f"run_dir={cache_dir}/run", f"data.cache_dir={cache_dir}", *SYNTHETIC])
    prefix, bins = prepare_dataset(cfg.data, cfg.eval.bins)
    loader = build_loader(cfg.data, prefix, torch.device("cpu"), rank, world_size)
    labels = [batch_labels.tolist() for images, batch_labels in loader]
    return prefix, bins, (loader.rank, loader.world_size, loader.num_classes, loader.num_images), labels


def test_the_data_builders_take_the_data_section(tmp_path):
    """Rank 0 writes the synthetic set once while rank 1 waits; each loader reads its half."""
    from partialfc.train.config import load_config
    from partialfc.train.data import prepare_dataset, synthetic_prefix

    results = run_distributed(_builders, 2, str(tmp_path), timeout=120)
    data = load_config(None, [f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}", *SYNTHETIC]).data
    prefix = synthetic_prefix(data)
    assert prefix.startswith(str(tmp_path)) and os.path.exists(prefix + ".rec")
    assert os.listdir(tmp_path) == [os.path.basename(os.path.dirname(prefix))]  # one set, no temporary left
    for rank, (got_prefix, bins, shape, labels) in enumerate(results):
        assert (got_prefix, bins, shape) == (prefix, [prefix + ".bin"], (rank, 2, 6, 24))
        assert len(labels) == 4 and all(len(b) == 3 and all(0 <= y < 6 for y in b) for b in labels)  # 12 of 24 each
    with pytest.raises(InputNotFoundError, match=r"verification set .*gone\.bin not found \(eval\.bins\)"):
        prepare_dataset(data, [str(tmp_path / "gone.bin")])
    data.synthetic.verification_pairs = 0  # another set (another digest); no .bin of its own
    assert synthetic_prefix(data) != prefix and prepare_dataset(data, [])[1] == []
