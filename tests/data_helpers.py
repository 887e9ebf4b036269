"""Shared fixtures for the data tests: a RecordIO writer built by hand from the format
description (independent of partialfc.data.recordio) and small deterministic images."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

MAGIC = 0xCED7230A


def hand_frame(payload: bytes) -> bytes:
    """Frame one record exactly as docs/formats.md describes (split at aligned magics)."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
    starts = [0] + [c + 4 for c in cuts]
    ends = cuts + [len(payload)]
    out = b""
    for n, (a, b) in enumerate(zip(starts, ends)):
        if len(starts) == 1:
            cflag = 0
        else:
            cflag = 1 if n == 0 else (3 if n == len(starts) - 1 else 2)
        out += struct.pack("<II", MAGIC, (cflag << 29) | (b - a)) + payload[a:b]
    return out + b"\0" * (-len(out) % 4)


def hand_image_payload(label: float, image: bytes, key: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", 0, label, key, id2) + image


def hand_label_array_payload(values, image: bytes = b"", id_: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", len(values), 0.0, id_, id2) + struct.pack(f"<{len(values)}f", *values) + image


def write_hand_rec(prefix, payloads_by_key) -> tuple[str, str]:
    """Write ``prefix.rec``/``prefix.idx`` from ``[(key, payload), ...]`` with plain file I/O."""
    rec, idx = f"{prefix}.rec", f"{prefix}.idx"
    lines = []
    with open(rec, "wb") as f:
        for key, payload in payloads_by_key:
            lines.append(f"{key}\t{f.tell()}\n")
            f.write(hand_frame(payload))
    with open(idx, "w") as f:
        f.writelines(lines)
    return rec, idx


def smooth_image(seed: int, size: int = 112) -> np.ndarray:
    """A smooth, deterministic uint8 RGB image (JPEG-friendly, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_header_dataset(prefix, labels, image_seed: int = 0) -> tuple[str, str]:
    """A header-flavour dataset (InsightFace layout) with one JPEG per label, written by hand.
    Images of one identity must be contiguous in ``labels`` (sorted)."""
    labels = list(labels)
    n = len(labels)
    classes = sorted(set(labels))
    records = [(0, hand_label_array_payload([n + 1, n + 1 + len(classes)]))]
    for i, label in enumerate(labels):
        records.append((i + 1, hand_image_payload(label, jpeg_bytes(smooth_image(image_seed + i)), key=i + 1)))
    for c in classes:
        first = 1 + labels.index(c)
        end = first + labels.count(c)
        records.append((n + 1 + c, hand_label_array_payload([first, end])))
    return write_hand_rec(prefix, records)


def write_unique_label_dataset(prefix, n: int) -> tuple[str, str]:
    """A plain-flavour dataset of ``n`` smooth JPEGs where record ``k`` has label ``k``, so a
    label identifies the sample. Written by hand."""
    return write_hand_rec(prefix, [(k, hand_image_payload(k, jpeg_bytes(smooth_image(k)), key=k))
                                   for k in range(n)])
