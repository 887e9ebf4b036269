"""MXNet RecordIO container, byte-compatible with dmlc-core / ``mx.recordio``, without MXNet.

A ``.rec`` file is a sequence of records. Each record is framed (little-endian) as
``uint32 magic = 0xced7230a``, ``uint32 lrecord = (cflag << 29) | length``, ``length`` payload
bytes, zero padding to a 4-byte boundary. A payload that contains the magic bytes at a
4-byte-aligned offset is split there into chunks (cflag 1 = first, 2 = middle, 3 = last) and the
4 magic bytes are dropped; readers re-insert them when joining. The ``.idx`` file is text, one
``key<TAB>offset`` line per record (offset of the record's first magic).

Payloads of image datasets are ``IRHeader`` (``<IfQQ``: flag, label, id, id2) + ``flag`` float32
labels when ``flag > 0`` + image bytes (see :func:`pack_payload` for how exact class ids above
2^24 are kept).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from partialfc.errors import RecordIOError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
MAX_CHUNK = (1 << 29) - 1
FLOAT32_EXACT_LIMIT = 1 << 24  # float32 holds every integer up to here, not beyond
PENDING = ".pending"  # suffix of a complete index waiting for its .rec (RecordWriter.close)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte image-record header. ``label`` is float32; ``id``/``id2`` are uint64."""

    flag: int
    label: float
    id: int
    id2: int


def _align4(n: int) -> int:
    return (n + 3) & ~3


def frame(payload: bytes) -> bytes:
    """Frame one payload as it is stored in a ``.rec`` file (split at aligned magics, padded)."""
    chunks = []
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            chunks.append(payload[start:pos])
            start = pos + 4
        pos = payload.find(MAGIC_BYTES, pos + 1)
    chunks.append(payload[start:])
    if any(len(c) > MAX_CHUNK for c in chunks):
        raise ValueError(f"record chunk longer than {MAX_CHUNK} bytes")
    out = bytearray()
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        cflag = 0 if last == 0 else (1 if i == 0 else (3 if i == last else 2))
        out += MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(chunk)) + chunk
    out += b"\0" * (_align4(len(out)) - len(out))
    return bytes(out)


def pack_payload(label: int | Sequence[float], image: bytes, key: int = 0) -> bytes:
    """Payload of an image record: IRHeader + optional label array + ``image`` bytes.

    An integer ``label`` (a class id) is written as ``flag=0``, the float32 ``label`` field
    (what MXNet, InsightFace and DALI read; inexact above 2^24) and, **exactly**, in the uint64
    ``id2`` field; ``id`` holds ``key`` as im2rec does. :func:`exact_label` reads it back.
    A sequence of floats is written as a ``flag=len(label)`` label array (header label 0).
    """
    if isinstance(label, (int, np.integer)):
        label = int(label)
        if label < 0:
            raise ValueError(f"class id must be >= 0, got {label}")
        header = struct.pack(IR_FORMAT, 0, float(label), key, label)
        return header + image
    values = np.asarray(label, dtype="<f4")
    return struct.pack(IR_FORMAT, len(values), 0.0, key, 0) + values.tobytes() + image


def pack_range(first: int, end: int) -> bytes:
    """Payload of a dataset-header (key 0: images ``[1, first)``, identity records
    ``[first, end)``) or identity record (its images' key range): ``flag=2``, label array
    ``(first, end)`` as float32, and exactly in the uint64 ``id`` / ``id2`` fields."""
    return struct.pack(IR_FORMAT, 2, 0.0, first, end) + np.array([first, end], dtype="<f4").tobytes()


def unpack_range(header: IRHeader, labels: np.ndarray) -> tuple[int, int]:
    """Exact ``(first, end)`` of a record written by :func:`pack_range` (or by MXNet tools)."""
    return exact_integer(float(labels[0]), header.id), exact_integer(float(labels[1]), header.id2)


def unpack_payload(payload: bytes) -> tuple[IRHeader, np.ndarray | None, bytes]:
    """Split a payload into (header, float32 label array or None when flag == 0, image bytes)."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte header")
    header = IRHeader(*struct.unpack_from(IR_FORMAT, payload))
    if header.flag == 0:
        return header, None, payload[IR_SIZE:]
    end = IR_SIZE + 4 * header.flag
    if len(payload) < end:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than its {header.flag} labels")
    return header, np.frombuffer(payload, dtype="<f4", count=header.flag, offset=IR_SIZE), payload[end:]


def exact_integer(value: float, exact: int) -> int:
    """The integer a float32 ``value`` stands for: ``exact`` (a uint64 field) when it is set and
    agrees with ``value`` after float32 rounding, else ``value`` itself (exact below 2^24)."""
    if exact and np.float32(exact) == np.float32(value):
        return int(exact)
    if not np.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"label {value} is not a non-negative integer")
    return int(value)


def exact_label(header: IRHeader, labels: np.ndarray | None) -> int:
    """The exact class id of an image record (first label of a label array)."""
    value = header.label if labels is None else (float(labels[0]) if len(labels) else header.label)
    return exact_integer(value, header.id2)


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file into int64 arrays (keys, offsets), in file order."""
    with open(idx_path, "rb") as f:
        text = f.read()
    fields = text.split()
    if len(fields) % 2:
        raise RecordIOError(f"{idx_path}: odd number of fields; each line must be 'key<TAB>offset'")
    try:
        pairs = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError) as e:
        raise RecordIOError(f"{idx_path}: non-integer or out-of-range field ({e})") from None
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def write_index(idx_path: str | os.PathLike, keys: Sequence[int], offsets: Sequence[int]) -> None:
    """Write a ``.idx`` file atomically (synced to disk before it replaces ``idx_path``)."""
    tmp = f"{idx_path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, idx_path)


def finish_interrupted_write(rec_path: str, idx_path: str) -> None:
    """Complete a :class:`RecordWriter` commit killed between its two renames: the new ``.rec``
    is in place (no ``.rec.tmp`` left) and its complete index waits as ``.idx.pending``."""
    pending = idx_path + PENDING
    if os.path.exists(pending) and not os.path.exists(rec_path + ".tmp"):
        os.replace(pending, idx_path)
        log.warning("%s: completed an interrupted write (the index %s was still pending)", rec_path, pending)


class RecordReader:
    """Random access (by key or byte offset) and sequential iteration over a ``.rec`` file.

    Reads with ``os.pread``, so one reader may serve several threads; it pickles without its
    file descriptor (DataLoader workers reopen the file).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = str(rec_path)
        self.idx_path = None if idx_path is None else str(idx_path)
        self.size = os.path.getsize(self.rec_path)
        self._fd: int | None = None
        self._pid = -1
        self.offset_of: dict[int, int] = {}
        if self.idx_path is not None:
            keys, offsets = read_index(self.idx_path)
            self.offset_of = dict(zip(keys.tolist(), offsets.tolist()))

    def _where(self, key) -> str:
        return f"{self.rec_path}: record {key}"

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, n, offset)

    def keys(self) -> list[int]:
        return list(self.offset_of)

    def read(self, key: int) -> bytes:
        """Payload of the record with index key ``key``."""
        if key not in self.offset_of:
            raise KeyError(f"{self.rec_path}: no record with key {key} in {self.idx_path}")
        return self.read_at(self.offset_of[key], key)[0]

    def read_at(self, offset: int, key: int | None = None) -> tuple[bytes, int]:
        """(payload, offset of the next record) for the record starting at byte ``offset``."""
        where = self._where(f"{key} at offset {offset}" if key is not None else f"at offset {offset}")
        if not 0 <= offset <= self.size - 8:
            raise RecordIOError(f"{where}: offset past the end of the file ({self.size} bytes)")
        parts = []
        expected = (0, 1)
        while True:
            head = self._pread(8, offset)
            if len(head) < 8:
                raise RecordIOError(f"{where}: truncated (chunk header at {offset} past end of file)")
            magic, lrecord = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at byte {offset}")
            cflag, length = lrecord >> 29, lrecord & MAX_CHUNK
            if cflag not in expected:
                raise RecordIOError(f"{where}: unexpected chunk flag {cflag} at byte {offset}")
            data = self._pread(length, offset + 8)
            if len(data) < length:
                raise RecordIOError(f"{where}: truncated ({length} payload bytes announced, "
                                    f"{len(data)} left in the file)")
            parts.append(data)
            offset += 8 + _align4(length)
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts), offset
            expected = (2, 3)

    def read_prefix(self, offset: int, n: int, key: int | None = None) -> bytes:
        """The first ``n`` payload bytes (fewer if the payload is shorter) of the record at
        ``offset``, reading only what is needed when the first chunk holds them."""
        head = self._pread(8 + n, offset)
        if len(head) >= 8:
            magic, lrecord = struct.unpack_from("<II", head)
            length = lrecord & MAX_CHUNK
            if magic == MAGIC and lrecord >> 29 == 0 and offset + 8 + length <= self.size:
                return head[8:8 + min(n, length)]
        return self.read_at(offset, key)[0][:n]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Sequential scan of the whole file, index not needed: yields (offset, payload)."""
        offset = 0
        while offset < self.size:
            payload, next_offset = self.read_at(offset)
            yield offset, payload
            offset = next_offset

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class RecordWriter:
    """Write a ``.rec`` + ``.idx`` pair atomically: both go to ``*.tmp`` files that replace the
    targets only on a clean :meth:`close` (a crash or exception leaves no valid-looking file).

    The commit: the complete index is synced and renamed to ``.idx.pending``, then the ``.rec``
    replaced, then the index. A kill between the two replacements leaves the new ``.rec``
    beside the old ``.idx``; :func:`finish_interrupted_write` (run by every dataset open)
    completes it, so the pair on disk is always the old one or the new one."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = str(rec_path), str(idx_path)
        Path(self.rec_path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{self.rec_path}.tmp"
        self._file = open(self._tmp, "wb")
        self.keys: list[int] = []
        self.offsets: list[int] = []

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under ``key``; returns its byte offset."""
        offset = self._file.tell()
        self._file.write(frame(payload))
        self.keys.append(int(key))
        self.offsets.append(offset)
        return offset

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        write_index(self.idx_path + PENDING, self.keys, self.offsets)
        os.replace(self._tmp, self.rec_path)
        os.replace(self.idx_path + PENDING, self.idx_path)

    def abort(self) -> None:
        """Drop everything written (temporary files removed, targets untouched)."""
        self._file.close()
        for path in (self._tmp, self.idx_path + PENDING + ".tmp", self.idx_path + PENDING):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
