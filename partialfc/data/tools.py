"""Dataset tools behind ``partialfc data ...``: pack a folder tree, check, shuffle, DALI index."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from partialfc.data.dataset_index import find_corrupt_images, open_dataset, resolve_paths
from partialfc.data.images import encode_jpeg
from partialfc.data.parallel import ordered_map
from partialfc.data.recordio import RecordWriter, pack_payload, pack_range
from partialfc.errors import ImageFileError, InputNotFoundError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class CheckReport:
    """What ``partialfc data check`` prints."""

    rec_path: str
    flavour: str
    num_images: int
    num_classes: int
    label_range: tuple[int, int]
    bad_records: list[tuple[int, str]] = field(default_factory=list)


def check_dataset(path: str, decode: bool = True, workers: int | None = None, progress: bool = True) -> CheckReport:
    """Read every record (and decode every image when ``decode``); list the bad ones."""
    dataset = open_dataset(path, on_error="skip", progress=progress)
    corrupt = find_corrupt_images(dataset, workers, progress) if decode else []
    return CheckReport(dataset.rec_path, dataset.flavour, dataset.num_images - len(corrupt), dataset.num_classes,
                       dataset.label_range(), sorted(dataset.skipped + corrupt))


@dataclass
class PackResult:
    """What ``partialfc data pack`` wrote; ``skipped``: the files left out, as ``path: reason``."""

    num_images: int
    num_classes: int
    skipped: list[str] = field(default_factory=list)


def _load_for_pack(task: tuple[str, int, int | None, int]) -> tuple[bytes | None, str]:
    """``(JPEG bytes, "")`` of one source image, decoded in full first (a truncated file fails
    here, not in training): the file itself if it is a JPEG of the right size and no resize is
    asked, else re-encoded (RGB, resized to ``size`` when given). ``(None, reason)`` if the file
    cannot be decoded."""
    from PIL import Image
    path, quality, size, _ = task
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "JPEG" and im.mode == "RGB" and (size is None or im.size == (size, size)):
                return data, ""
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return encode_jpeg(im, quality), ""
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for corrupt data
        return None, f"{path}: cannot be decoded ({e})"


def list_image_folders(src_dir: str) -> list[tuple[str, list[str]]]:
    """``[(identity folder name, sorted image paths), ...]`` sorted by folder name; class id =
    position in this list. Folders without images are skipped."""
    if not os.path.isdir(src_dir):
        raise InputNotFoundError(f"{src_dir}: no such folder")
    identities = []
    for entry in sorted(os.scandir(src_dir), key=lambda e: e.name):
        if entry.is_dir():
            files = sorted(f.path for f in os.scandir(entry.path)
                           if f.is_file() and Path(f.name).suffix.lower() in IMAGE_SUFFIXES)
            if files:
                identities.append((entry.name, files))
    if not identities:
        raise InputNotFoundError(f"{src_dir}: no identity folders with images")
    return identities


def pack_folder(src_dir: str, out_prefix: str, size: int | None = 112, quality: int = 95,
                workers: int | None = None, progress: bool = True, skip_bad: bool = False) -> PackResult:
    """Pack ``src_dir/<identity>/<image>`` into a header-flavour ``out_prefix.rec/.idx`` plus
    ``out_prefix.names`` (class id -> folder name): :func:`pack_identities` of
    :func:`list_image_folders`."""
    return pack_identities(list_image_folders(src_dir), out_prefix, size, quality, workers, progress, skip_bad)


def pack_identities(identities: list[tuple[str, list[str]]], out_prefix: str, size: int | None = 112,
                    quality: int = 95, workers: int | None = None, progress: bool = True,
                    skip_bad: bool = False) -> PackResult:
    """Pack ``[(identity name, image paths), ...]`` (class id = position) into a header-flavour
    ``out_prefix.rec/.idx`` plus ``out_prefix.names``. Atomic. Every image is decoded: one that
    cannot be is an :class:`ImageFileError` (nothing written), or with ``skip_bad`` left out
    and listed. Images are keys ``1..N`` in identity order; the dataset header (key 0) is
    written after them, once ``N`` is known."""
    tasks = [(path, quality, size, label) for label, (_, files) in enumerate(identities) for path in files]
    k = len(identities)
    counts, skipped = [0] * k, []
    with RecordWriter(out_prefix + ".rec", out_prefix + ".idx") as writer:
        key = 1
        for (jpeg, reason), task in zip(ordered_map(_load_for_pack, tasks, len(tasks), workers, desc="packing",
                                                    unit="img", progress=progress, chunksize=32), tasks):
            if jpeg is None:
                if not skip_bad:
                    raise ImageFileError(f"{reason}; pass --skip-bad to leave bad files out")
                skipped.append(reason)
                continue
            writer.write(key, pack_payload(task[3], jpeg, key=key))
            counts[task[3]] += 1
            key += 1
        n = key - 1
        first = 1
        for label, count in enumerate(counts):
            writer.write(n + 1 + label, pack_range(first, first + count))
            first += count
        writer.write(0, pack_range(n + 1, n + 1 + k))
    tmp = out_prefix + ".names.tmp"
    Path(tmp).write_text("".join(f"{name}\n" for name, _ in identities), encoding="utf-8",
                         errors="surrogateescape")  # folder names as the file system gives them
    os.replace(tmp, out_prefix + ".names")
    return PackResult(n, k, skipped)


def shuffle_dataset(src: str, out_prefix: str, seed: int = 0, progress: bool = True) -> int:
    """Copy the image records of ``src`` in a random order into a plain-flavour
    ``out_prefix.rec/.idx`` (keys ``0..N-1``; identity key ranges no longer hold, so no header).
    Payloads are copied byte for byte. Returns the number of images."""
    from tqdm import tqdm
    dataset = open_dataset(src, progress=progress)
    order = np.random.default_rng(seed).permutation(dataset.num_images)
    reader = dataset.reader()
    with RecordWriter(out_prefix + ".rec", out_prefix + ".idx") as writer:
        for new_key, i in enumerate(tqdm(order, desc="shuffling", unit="rec", disable=not progress,
                                         mininterval=0.5)):
            writer.write(new_key, reader.read_at(int(dataset.offsets[i]), int(dataset.keys[i]))[0])
    return dataset.num_images


def write_dali_index(path: str, out: str | None = None) -> str:
    """Write the index DALI needs (image records only) to ``out`` (default ``PREFIX.dali.idx``)."""
    rec, _ = resolve_paths(path)
    return open_dataset(path).write_dali_index(out or rec[:-4] + ".dali.idx")
