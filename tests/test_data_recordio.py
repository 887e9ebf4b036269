"""RecordIO container and dataset detection, checked against files written by hand from the
format description (tests/data_helpers.py), not by the module under test."""

from __future__ import annotations

import os
import struct

import pytest

from partialfc.data.dataset_index import HEADER, PLAIN, open_dataset
from partialfc.data.recordio import (MAGIC_BYTES, RecordIOError, RecordReader, RecordWriter, frame,
                                     pack_payload, unpack_payload)
from tests.data_helpers import (hand_frame, hand_image_payload, hand_label_array_payload, jpeg_bytes,
                                smooth_image, write_hand_rec, write_header_dataset)

# Magic at aligned offsets 0, 4 (back to back), 12, at the very end (32), and unaligned at 23.
TRICKY = (MAGIC_BYTES + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"xyzuvw"
          + b"q" + MAGIC_BYTES + b"pad" + b"ab" + MAGIC_BYTES)


def test_hand_written_file_reads_back(tmp_path):
    payloads = [(0, hand_image_payload(3.0, b"JPEGDATA")), (7, b"x" * 5), (9, TRICKY), (2, b"")]
    rec, idx = write_hand_rec(tmp_path / "d", payloads)
    reader = RecordReader(rec, idx)
    assert [reader.read(k) for k, _ in payloads] == [p for _, p in payloads]
    assert [p for _, p in reader] == [p for _, p in payloads]  # sequential scan, no index
    header, labels, image = unpack_payload(reader.read(0))
    assert (header.flag, header.label, labels, image) == (0, 3.0, None, b"JPEGDATA")


def test_split_record_layout_on_disk(tmp_path):
    """The writer's bytes equal the hand framing, and the split chunks carry cflags 1, 2.., 3."""
    assert frame(TRICKY) == hand_frame(TRICKY)
    data = frame(TRICKY)
    flags, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == 0xCED7230A
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
    assert flags == [1, 2, 2, 2, 3]  # aligned magics at 0, 4, 12, 32 (end); 23 is unaligned


@pytest.mark.parametrize("payload", [b"", b"a", MAGIC_BYTES, TRICKY, MAGIC_BYTES * 5 + b"z",
                                     os.urandom(3001)])
def test_writer_reader_round_trip(tmp_path, payload):
    with RecordWriter(tmp_path / "r.rec", tmp_path / "r.idx") as w:
        w.write(5, b"before")
        w.write(6, payload)
        w.write(7, b"after")
    reader = RecordReader(tmp_path / "r.rec", tmp_path / "r.idx")
    assert (reader.read(5), reader.read(6), reader.read(7)) == (b"before", payload, b"after")


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "r.rec", tmp_path / "r.idx") as w:
            w.write(0, b"x")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_both_flavours_detected(tmp_path):
    labels = [0, 0, 1, 2, 2, 2]
    write_header_dataset(tmp_path / "h", labels)
    ds = open_dataset(tmp_path / "h.rec")
    assert (ds.flavour, ds.num_images, ds.num_classes) == (HEADER, 6, 3)
    assert ds.keys.tolist() == [1, 2, 3, 4, 5, 6] and ds.labels.tolist() == labels

    write_hand_rec(tmp_path / "p", [(k, hand_image_payload(l, jpeg_bytes(smooth_image(k)), key=k))
                                    for k, l in enumerate([4, 1, 4, 0])])
    ds = open_dataset(tmp_path / "p")  # prefix works too
    assert (ds.flavour, ds.num_images, ds.num_classes) == (PLAIN, 4, 5)
    assert ds.labels.tolist() == [4, 1, 4, 0] and ds.label_range() == (0, 4)


def test_header_flavour_num_classes_comes_from_header(tmp_path):
    """Identities with no image still count: num_classes is the header's K, not max+1."""
    n = 2
    records = [(0, hand_label_array_payload([n + 1, n + 1 + 4])),
               (1, hand_image_payload(0, b"img")), (2, hand_image_payload(1, b"img"))]
    records += [(n + 1 + c, hand_label_array_payload([1, 1])) for c in range(4)]
    write_hand_rec(tmp_path / "h", records)
    assert open_dataset(tmp_path / "h").num_classes == 4


def test_labels_above_2_24_round_trip_exactly(tmp_path):
    big = [2**24 + 1, 2**24 + 3, 29_000_001, 2**40 + 7]
    with RecordWriter(tmp_path / "b.rec", tmp_path / "b.idx") as w:
        for k, label in enumerate(big):
            w.write(k, pack_payload(label, b"img", key=k))
    ds = open_dataset(tmp_path / "b", num_classes=big[-1] + 1)  # sparse labels: the count is stated
    assert ds.labels.tolist() == big and ds.num_classes == big[-1] + 1
    header, _, _ = unpack_payload(RecordReader(tmp_path / "b.rec", tmp_path / "b.idx").read(0))
    assert int(header.label) == 2**24  # the float field alone is inexact
    # A foreign file whose id2 is unset keeps float semantics (exact below 2^24).
    write_hand_rec(tmp_path / "f", [(0, hand_image_payload(2**24 - 1, b"img", key=0))])
    assert open_dataset(tmp_path / "f", num_classes=2**24).labels.tolist() == [2**24 - 1]


def _write_bad(tmp_path, name, payload_of_second):
    good = hand_image_payload(0, b"img")
    return write_hand_rec(tmp_path / name, [(0, good), (1, payload_of_second), (2, good)])


def test_truncated_rec(tmp_path):
    rec, _ = write_hand_rec(tmp_path / "t", [(k, hand_image_payload(k, b"x" * 100)) for k in range(3)])
    os.truncate(rec, os.path.getsize(rec) - 50)
    with pytest.raises(RecordIOError, match=r"t\.rec: record 2 .*truncated"):
        open_dataset(tmp_path / "t")
    ds = open_dataset(tmp_path / "t", on_error="skip")
    assert ds.keys.tolist() == [0, 1] and [k for k, _ in ds.skipped] == [2]


def test_offset_past_end(tmp_path):
    rec, idx = write_hand_rec(tmp_path / "o", [(k, hand_image_payload(k, b"x")) for k in range(2)])
    with open(idx, "a") as f:
        f.write(f"9\t{os.path.getsize(rec) + 400}\n")
    with pytest.raises(RecordIOError, match=r"o\.rec: record 9 .*past the end"):
        open_dataset(tmp_path / "o")
    assert open_dataset(tmp_path / "o", on_error="skip").num_images == 2


def test_bad_magic_and_bad_labels(tmp_path):
    rec, idx = write_hand_rec(tmp_path / "m", [(k, hand_image_payload(k, b"x" * 8)) for k in range(3)])
    with open(idx, "w") as f:  # point record 1 into the middle of record 0
        f.write("0\t0\n1\t12\n2\t80\n")
    with pytest.raises(RecordIOError, match=r"m\.rec: record 1 .*bad magic"):
        open_dataset(tmp_path / "m")
    _write_bad(tmp_path, "n", hand_image_payload(2.5, b"img"))
    with pytest.raises(RecordIOError, match=r"n\.rec: record 1 .*2\.5 is not a non-negative integer"):
        open_dataset(tmp_path / "n")


def test_label_out_of_range_in_header_dataset(tmp_path):
    write_header_dataset(tmp_path / "h", [0, 1, 1])
    reader = RecordReader(tmp_path / "h.rec", tmp_path / "h.idx")
    records = [(k, reader.read(k)) for k in reader.keys()]
    records[2] = (2, hand_image_payload(7, b"img", key=2))  # 2 classes, label 7
    write_hand_rec(tmp_path / "bad", records)
    with pytest.raises(RecordIOError, match=r"bad\.rec: record 2 .*label 7 out of range \[0, 2\)"):
        open_dataset(tmp_path / "bad")
    ds = open_dataset(tmp_path / "bad", on_error="skip")
    assert ds.keys.tolist() == [1, 3] and ds.labels.tolist() == [0, 1]
