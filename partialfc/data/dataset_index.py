"""Which records of a RecordIO dataset are images, and their exact labels.

Two flavours are detected from the data:

* ``header`` (InsightFace / published face datasets): record 0 has ``flag >= 2``, no image and
  the label array ``(N+1, N+1+K)``; images are keys ``1..N``; keys ``N+1..N+K`` are identity
  records (each identity's key range); ``num_classes = K``.
* ``plain`` (im2rec): every record is an image; ``num_classes = max(label) + 1``.

Opening a dataset reads the header of every image record (a few bytes each; cached next to the
index for later opens), so labels are validated once, up front: a label that is not a finite
non-negative integer or lies outside ``[0, num_classes)``, a plain-flavour label far above the
labels in use (``SPARSE_SLACK``), an offset past the end, a truncated record - each is an error
naming the file and the record key, or, with ``on_error="skip"``, a record left out and
counted in the log.

Under a process group (``open_dataset(..., distributed=True)``, what the trainer does) the
first start reads the headers once, on rank 0: it writes the cache and broadcasts the arrays to
the other ranks, so a read-only dataset folder costs no extra scan either. A later start finds
the cache valid on every rank and loads it there, with no scan and no broadcast. An error of
any rank (a missing file, a bad record) is raised on every rank with the same message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from partialfc.data.images import decode_face
from partialfc.data.parallel import ordered_map
from partialfc import dist, errors
from partialfc.data.recordio import (IR_SIZE, RecordIOError, RecordReader, exact_label, finish_interrupted_write,
                                     read_index, unpack_payload, unpack_range, write_index)
from partialfc.errors import InputNotFoundError, PartialFCError
from partialfc.ops.collectives import broadcast, broadcast_object, communicates, gather_sizes

log = logging.getLogger(__name__)

HEADER, PLAIN = "header", "plain"
_PREFIX_BYTES = IR_SIZE + 4 * 8  # header plus a short label array
_CHUNK = 256  # records per parallel task
_CACHE_VERSION = 1
MAX_CLASSES = (1 << 63) - 1  # the largest class count accepted: labels are int64
SPARSE_SLACK = 64  # plain flavour: at most 2 x distinct labels + this many classes unless stated


def resolve_paths(path: str | os.PathLike) -> tuple[str, str]:
    """``(rec_path, idx_path)`` from a ``.rec`` path, an ``.idx`` path or their common prefix."""
    path = str(path)
    prefix = path[:-4] if path.endswith((".rec", ".idx")) else path
    rec, idx = prefix + ".rec", prefix + ".idx"
    finish_interrupted_write(rec, idx)
    for p in (rec, idx):
        if not os.path.exists(p):
            raise InputNotFoundError(f"{p} not found (dataset given as {path!r})")
    return rec, idx


@dataclass
class RecordDataset:
    """The image records of one ``.rec``/``.idx`` pair.

    ``keys``, ``offsets``, ``labels``: int64 arrays of shape ``(num_images,)`` in index order;
    ``labels`` are exact class ids in ``[0, num_classes)``. ``skipped`` lists
    ``(key, reason)`` of records left out with ``on_error="skip"``.
    """

    rec_path: str
    idx_path: str
    flavour: str
    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    num_classes: int
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.keys)

    def label_range(self) -> tuple[int, int]:
        return (int(self.labels.min()), int(self.labels.max())) if self.num_images else (0, -1)

    def reader(self) -> RecordReader:
        return RecordReader(self.rec_path)

    def select(self, keep: np.ndarray, skipped: list[tuple[int, str]]) -> "RecordDataset":
        """A copy holding only the records where ``keep`` (bool, ``(num_images,)``) is true."""
        return RecordDataset(self.rec_path, self.idx_path, self.flavour, self.keys[keep],
                             self.offsets[keep], self.labels[keep], self.num_classes,
                             self.skipped + skipped)

    def write_dali_index(self, path: str | os.PathLike) -> str:
        """Write an index listing only the image records (what ``fn.readers.mxnet`` needs)."""
        write_index(path, self.keys, self.offsets)
        return str(path)


def _detect_header(reader: RecordReader, offset_of: dict[int, int]) -> tuple[int, int] | None:
    """``(first_identity_key, end_key)`` from a dataset-header record at key 0, else None."""
    if 0 not in offset_of:
        return None
    header, labels, image = unpack_payload(reader.read_at(offset_of[0], 0)[0])
    if header.flag < 2 or image or labels is None:
        return None
    first, end = unpack_range(header, labels)
    return (first, end) if 1 <= first <= end else None


def _fail(on_error: str, message: str, skipped: list, key: int) -> None:
    if on_error == "raise":
        raise RecordIOError(message)
    skipped.append((key, message))


def _check_chunk(task: tuple[str, list[tuple[int, int]]]) -> list[tuple[int, str]]:
    """Decode every image of ``[(key, offset), ...]`` as training does; return ``(key, reason)``
    of the bad ones."""
    rec_path, records = task
    reader = RecordReader(rec_path)
    bad = []
    for key, offset in records:
        try:
            decode_face(unpack_payload(reader.read_at(offset, key)[0])[2], f"{rec_path}: record {key}")
        except RecordIOError as e:
            bad.append((key, str(e)))
    reader.close()
    return bad


def find_corrupt_images(dataset: RecordDataset, workers: int | None = None,
                        progress: bool = True) -> list[tuple[int, str]]:
    """``(key, reason)`` for every image record that cannot be read or decoded as a training
    image (:func:`partialfc.data.images.decode_face`: the loaders' decode and size check)."""
    pairs = list(zip(dataset.keys.tolist(), dataset.offsets.tolist()))
    chunks = [(dataset.rec_path, pairs[i:i + _CHUNK]) for i in range(0, len(pairs), _CHUNK)]
    bad: list[tuple[int, str]] = []
    for result in ordered_map(_check_chunk, chunks, len(chunks), workers if len(chunks) > 1 else 1,
                              desc="decoding images", unit="chunk", progress=progress, chunksize=1):
        bad += result
    return bad


def _scan_labels(rec_path: str, idx_path: str, on_error: str, progress: bool | None) -> RecordDataset:
    """Read the index and every image record's header (a few bytes each): the dataset before
    the class-count checks of :func:`_check_classes` (plain flavour: ``num_classes`` = max + 1)."""
    all_keys, all_offsets = read_index(idx_path)
    reader = RecordReader(rec_path)
    header_range = _detect_header(reader, dict(zip(all_keys.tolist(), all_offsets.tolist())))
    if header_range is None:
        flavour, image_mask, num_classes = PLAIN, np.ones(len(all_keys), bool), None
    else:
        first, end = header_range
        flavour, num_classes = HEADER, end - first
        image_mask = (all_keys >= 1) & (all_keys < first)
        if image_mask.sum() != first - 1:
            raise RecordIOError(f"{idx_path}: the dataset header announces {first - 1} images "
                                f"(keys 1..{first - 1}) but the index lists {int(image_mask.sum())}")
    keys, offsets = all_keys[image_mask], all_offsets[image_mask]
    labels = np.full(len(keys), -1, dtype=np.int64)
    skipped: list[tuple[int, str]] = []
    limit = min(num_classes, MAX_CLASSES) if num_classes is not None else MAX_CLASSES
    show = progress if progress is not None else (len(keys) > 200_000 and dist.get_rank() == 0)
    for i in tqdm(range(len(keys)), desc=f"reading labels of {os.path.basename(rec_path)}",
                  disable=not show, unit="rec", mininterval=1.0):
        key, offset = int(keys[i]), int(offsets[i])
        where = f"{rec_path}: record {key} (offset {offset})"
        try:
            prefix = reader.read_prefix(offset, _PREFIX_BYTES, key)
        except RecordIOError as e:  # already names the file and record
            _fail(on_error, str(e), skipped, key)
            continue
        try:
            label = exact_label(*unpack_payload(prefix)[:2])
        except RecordIOError as e:
            _fail(on_error, f"{where}: {e}", skipped, key)
            continue
        if label >= limit:
            _fail(on_error, f"{where}: label {label} out of range [0, {limit})", skipped, key)
            continue
        labels[i] = label
    reader.close()
    keep = labels >= 0
    if num_classes is None:
        num_classes = int(labels[keep].max()) + 1 if keep.any() else 0
    return RecordDataset(rec_path, idx_path, flavour, keys, offsets, labels, num_classes).select(keep, skipped)


def _check_classes(dataset: RecordDataset, num_classes: int | None, on_error: str) -> RecordDataset:
    """Apply a stated class count (``num_classes``), or else, in the plain flavour, refuse a class
    count far above the labels in use: more than ``2 x distinct + SPARSE_SLACK`` classes."""
    where = dataset.rec_path
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise RecordIOError(f"{where}: {num_classes} classes stated; give 1 to at most {MAX_CLASSES}")
    if dataset.flavour == HEADER:
        if num_classes not in (None, dataset.num_classes):
            raise RecordIOError(f"{where}: {num_classes} classes stated but the dataset header says "
                                f"{dataset.num_classes}")
        return dataset
    if num_classes is not None:
        limit, why = num_classes, f"out of range [0, {num_classes}) (the stated class count)"
    else:
        distinct = len(np.unique(dataset.labels))
        limit = 2 * distinct + SPARSE_SLACK
        why = (f"would make {dataset.num_classes} classes from {distinct} distinct labels (more than 2 x "
               f"{distinct} + {SPARSE_SLACK}): a stray label? State data.num_classes if the labels are sparse")
    outside = np.flatnonzero(dataset.labels >= limit)
    skipped: list[tuple[int, str]] = []
    for i in outside[np.argsort(-dataset.labels[outside], kind="stable")]:
        key, offset, label = int(dataset.keys[i]), int(dataset.offsets[i]), int(dataset.labels[i])
        _fail(on_error, f"{where}: record {key} (offset {offset}): label {label} {why}", skipped, key)
    keep = dataset.labels < limit
    kept = dataset.select(keep, sorted(skipped))
    if num_classes is not None:
        kept.num_classes = num_classes
    elif len(skipped):
        kept.num_classes = int(kept.labels.max()) + 1 if kept.num_images else 0
    return kept


def _cache_path(idx_path: str) -> str:
    return idx_path + ".labels.npz"


def _stamp(rec_path: str, idx_path: str) -> np.ndarray:
    """What the label cache is valid for: format version, then (inode, size, mtime_ns) of both files."""
    stats = [os.stat(rec_path), os.stat(idx_path)]
    return np.array([_CACHE_VERSION] + [v for st in stats for v in (st.st_ino, st.st_size, st.st_mtime_ns)],
                    dtype=np.int64)


def _load_cache(rec_path: str, idx_path: str) -> RecordDataset | None:
    """The scanned dataset from the label cache, or None when it is missing, damaged or stale."""
    try:
        with np.load(_cache_path(idx_path), allow_pickle=False) as z:
            if not np.array_equal(z["stamp"], _stamp(rec_path, idx_path)):
                return None
            return RecordDataset(rec_path, idx_path, str(z["flavour"]), z["keys"], z["offsets"], z["labels"],
                                 int(z["num_classes"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _save_cache(dataset: RecordDataset) -> None:
    """Write the label cache next to the index, atomically; skipped (logged) where it cannot be written."""
    path = _cache_path(dataset.idx_path)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # unique on a filesystem shared by nodes
    try:
        with open(tmp, "wb") as f:
            np.savez(f, stamp=_stamp(dataset.rec_path, dataset.idx_path), flavour=np.array(dataset.flavour),
                     keys=dataset.keys, offsets=dataset.offsets, labels=dataset.labels,
                     num_classes=np.array(dataset.num_classes, dtype=np.int64))
        os.replace(tmp, path)
    except OSError as e:
        log.info("label cache %s not written (%s); the labels are read again at the next start", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)


def _scan_and_cache(rec_path: str, idx_path: str, on_error: str, progress: bool | None) -> RecordDataset:
    """Read every record header (:func:`_scan_labels`) and cache the result unless records were skipped."""
    dataset = _scan_labels(rec_path, idx_path, on_error, progress)
    if not dataset.skipped:
        _save_cache(dataset)
    return dataset


def _open_local(path: str | os.PathLike, on_error: str, progress: bool | None) -> RecordDataset:
    """This process alone: the cache when valid, else a scan (that writes it)."""
    rec_path, idx_path = resolve_paths(path)
    dataset = _load_cache(rec_path, idx_path)
    return dataset if dataset is not None else _scan_and_cache(rec_path, idx_path, on_error, progress)


def _raise_if_failed(error: BaseException | None, src: int) -> None:
    """Collective: when rank ``src`` passes an error, every rank raises one with its message (``src``
    the error itself, the others the same :class:`PartialFCError` class, else a RecordIOError)."""
    sent = broadcast_object(None if error is None else (type(error).__name__, str(error)), src)
    if sent is None:
        return
    if dist.get_rank() == src and isinstance(error, PartialFCError):
        raise error
    kind, message = sent  # an OSError, MemoryError, ...: one line on every rank, the source too
    cls = getattr(errors, kind, None)
    raise (cls if isinstance(cls, type) and issubclass(cls, PartialFCError) else RecordIOError)(message)


_LOADED, _MISSING, _FAILED = 0, 1, 2  # what a rank found at a distributed open
HEARTBEAT_S = 5.0  # while rank 0 reads the labels, the other ranks meet it in a collective this often


def _run_on_rank0(fn):
    """Collective: ``(fn(), None)`` or ``(None, the exception it raised)`` on rank 0, ``(None, None)``
    elsewhere. ``fn`` runs in a thread while all ranks meet in a flag broadcast every
    :data:`HEARTBEAT_S` s: a scan longer than the process group's timeout times no rank out,
    a rank 0 that dies or hangs still does."""
    result: dict = {}
    thread = None
    if dist.get_rank() == 0:
        def work():
            try:
                result["value"] = fn()
            except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
                result["error"] = e
        thread = threading.Thread(target=work, name="read-labels", daemon=True)
        thread.start()
    done = torch.zeros(1)
    while not done.item():
        if thread is not None:
            thread.join(HEARTBEAT_S)
            done.fill_(0.0 if thread.is_alive() else 1.0)
        broadcast(done, 0)
    return result.get("value"), result.get("error")


def _open_distributed(path: str | os.PathLike, on_error: str, progress: bool | None) -> RecordDataset:
    """Collective :func:`open_dataset` of every rank of the world: when some rank has no valid
    cache, rank 0 alone loads or scans the labels (writing the cache) and broadcasts them."""
    error, dataset, sizes = None, None, [-1, -1]
    try:
        rec_path, idx_path = resolve_paths(path)
        sizes = [os.path.getsize(rec_path), os.path.getsize(idx_path)]
        dataset = _load_cache(rec_path, idx_path)
    except Exception as e:  # noqa: BLE001 - raised on every rank below
        error = e
    found = _FAILED if error is not None else _LOADED if dataset is not None else _MISSING
    states = gather_sizes(torch.tensor([found, *sizes]))
    failed = [r for r, (state, *_) in enumerate(states) if state == _FAILED]
    if failed:
        _raise_if_failed(error, failed[0])
    other = [r for r, (_, *seen) in enumerate(states) if seen != states[0][1:]]
    if other:
        raise RecordIOError(f"{rec_path}: ranks {other} see a .rec/.idx pair of other sizes than rank 0 "
                            f"({states[0][1]} / {states[0][2]} bytes): every rank must read the same dataset")
    if all(state == _LOADED for state, *_ in states):
        return dataset
    rank, start, cached = dist.get_rank(), time.perf_counter(), dataset
    dataset, error = _run_on_rank0(lambda: cached if cached is not None else
                                   _scan_and_cache(rec_path, idx_path, on_error, progress))
    _raise_if_failed(error, 0)
    meta = (dataset.flavour, dataset.num_classes, dataset.num_images, dataset.skipped) if rank == 0 else None
    flavour, classes, n, skipped = broadcast_object(meta, 0)
    arrays = ((dataset.keys, dataset.offsets, dataset.labels) if rank == 0
              else tuple(np.empty(n, dtype=np.int64) for _ in range(3)))
    for array in arrays:  # in place: torch.from_numpy shares the memory
        broadcast(torch.from_numpy(array), 0)
    if rank == 0:
        log.info("%s: labels of %d images sent to %d ranks (%.1f s)", rec_path, n, dist.get_world_size() - 1,
                 time.perf_counter() - start)
        return dataset
    return RecordDataset(rec_path, idx_path, flavour, *arrays, classes, skipped)


def open_dataset(path: str | os.PathLike, on_error: str = "raise", verify_images: bool = False,
                 progress: bool | None = None, num_classes: int | None = None,
                 distributed: bool = False) -> RecordDataset:
    """Open a dataset (``.rec``, ``.idx`` or prefix), detect its flavour, read and check labels.

    ``on_error``: ``"raise"`` (default) or ``"skip"`` bad records. ``verify_images`` also
    decodes every image (slow on big sets; :func:`find_corrupt_images`). ``num_classes``: a
    stated class count (labels must lie below it; needed for plain-flavour sets whose labels
    are sparse). The labels read are cached in ``<idx>.labels.npz`` (valid while the ``.rec``
    and ``.idx`` keep their inode, size and mtime), so later opens skip the per-record reads.

    ``distributed``: a collective of every rank of the process group (when there is one): a
    rank without a valid cache gets the labels from rank 0, which alone reads the headers
    (module docstring). Without it each process opens the dataset on its own.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if distributed and communicates():
        dataset = _open_distributed(path, on_error, progress)
    else:
        dataset = _open_local(path, on_error, progress)
    rec_path = dataset.rec_path
    dataset = _check_classes(dataset, num_classes, on_error)
    if verify_images:
        bad = find_corrupt_images(dataset)
        for key, reason in bad:
            _fail(on_error, reason, [], key)
        bad_keys = np.array([k for k, _ in bad], dtype=np.int64)
        dataset = dataset.select(~np.isin(dataset.keys, bad_keys), bad)
    if dataset.skipped:
        log.warning("%s: skipped %d bad record(s), e.g. %s", rec_path, len(dataset.skipped), dataset.skipped[0][1])
    return dataset
