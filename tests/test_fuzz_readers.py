"""Fuzzing the readers of files from disk (hypothesis, bounded examples and time per example):
whatever the bytes of a ``.rec``/``.idx`` pair or a ``.bin``, the readers raise only the
package's own errors (:class:`~partialfc.errors.PartialFCError`), never hang, and run no code
from the file. Inputs are random bytes and byte-level mutations of valid files."""

from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partialfc.data.recordio import RecordReader, RecordWriter, exact_label, pack_payload, unpack_payload
from partialfc.data.verification_bin import load_bin_images, read_bin
from partialfc.errors import PartialFCError

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _valid_recordio() -> tuple[bytes, bytes]:
    """A small ``.rec``/``.idx`` pair: three records, one of them larger than a few chunks' worth."""
    with tempfile.TemporaryDirectory() as folder:
        rec, idx = os.path.join(folder, "d.rec"), os.path.join(folder, "d.idx")
        with RecordWriter(rec, idx) as writer:
            for key, (label, image) in enumerate([(0, b"\xff\xd8jpeg"), ([1.0, 2.0], b"png" * 40), (7, b"")]):
                writer.write(key, pack_payload(label, image, key))
        with open(rec, "rb") as f, open(idx, "rb") as g:
            return f.read(), g.read()


MARKER = os.path.join(tempfile.gettempdir(), f"partialfc-fuzz-payload-ran-{os.getpid()}")


class Marker:
    """Unpickling it creates the directory MARKER."""

    def __reduce__(self):
        return os.mkdir, (MARKER,)


VALID_REC, VALID_IDX = _valid_recordio()
VALID_BIN = pickle.dumps(([b"\xff\xd8a", np.frombuffer(b"\x89PNGb", np.uint8)], [True]), protocol=2)
HOSTILE_BIN = pickle.dumps(([b"a", b"b"], [True], Marker()), protocol=4)


def mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with a few bytes overwritten, a piece cut out or the tail dropped."""
    def apply(edits):
        data = bytearray(base)
        for kind, at, value in edits:
            at = at % (len(data) + 1)
            if kind == 0 and at < len(data):
                data[at] = value
            elif kind == 1:
                del data[at:at + value % 16]
            else:
                del data[at:]
        return bytes(data)
    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4).map(apply)


def _read_everything(rec: str, idx: str | None) -> None:
    reader = RecordReader(rec, idx)
    try:
        for key in reader.keys():
            header, labels, _ = unpack_payload(reader.read(key))
            exact_label(header, labels)
        for _, payload in reader:
            header, labels, _ = unpack_payload(payload)
            exact_label(header, labels)
    finally:
        reader.close()


INDEX_TEXT = st.lists(st.tuples(st.integers(), st.integers()), max_size=4).map(
    lambda pairs: "".join(f"{key}\t{offset}\n" for key, offset in pairs).encode())


@FUZZ
@given(rec=st.one_of(st.binary(max_size=512), mutated(VALID_REC)),
       idx=st.one_of(st.just(VALID_IDX), st.binary(max_size=64), mutated(VALID_IDX), INDEX_TEXT))
def test_recordio_reader_raises_only_its_own_errors(rec, idx):
    with tempfile.TemporaryDirectory() as folder:
        paths = os.path.join(folder, "d.rec"), os.path.join(folder, "d.idx")
        for path, data in zip(paths, (rec, idx)):
            with open(path, "wb") as f:
                f.write(data)
        for index in (paths[1], None):
            try:
                _read_everything(paths[0], index)
            except PartialFCError:
                pass


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated(VALID_BIN), mutated(HOSTILE_BIN)))
def test_bin_reader_raises_only_its_own_errors_and_runs_nothing(data):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "v.bin")
        with open(path, "wb") as f:
            f.write(data)
        try:
            read_bin(path)
            load_bin_images(path)
        except PartialFCError:
            pass
        assert not os.path.exists(MARKER)


def test_the_fuzzed_files_are_valid_before_mutation(tmp_path):
    """The seeds of the mutations are files the readers accept (and the hostile one is refused)."""
    (tmp_path / "d.rec").write_bytes(VALID_REC)
    (tmp_path / "d.idx").write_bytes(VALID_IDX)
    _read_everything(str(tmp_path / "d.rec"), str(tmp_path / "d.idx"))
    (tmp_path / "v.bin").write_bytes(VALID_BIN)
    assert read_bin(tmp_path / "v.bin")[0] == [b"\xff\xd8a", b"\x89PNGb"]
