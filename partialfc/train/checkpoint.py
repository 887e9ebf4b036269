"""Atomic, resumable, reshardable checkpoints.

Layout of ``<run_dir>/checkpoints``::

    step_00001000/
        trainer.pt              rank 0: what every rank shares (the run's description and the
                                shared components' states)
        head_rank00000.pt ...   one per rank: its own state and its rows of the row-sharded
                                state (global classes [class_start, class_start + num_local))
        order.pt                the checkpoint's place in the order of writes
        deepspeed/              the DeepSpeed engine's own checkpoint (engine = deepspeed only)
    latest                      text file naming the newest complete step directory

A checkpoint is written into ``.tmp-step_*`` and renamed into place by rank 0 only after every
rank has written its file and ``trainer.pt`` (written last) is on disk; ``latest`` is then
replaced atomically. A crash mid-write leaves only a ``.tmp-*`` directory, never a
``step_*`` directory or a ``latest`` that looks valid. All ranks must see the same file
system. The files' contents are defined in :mod:`partialfc.train.state`; they are read
with ``torch.load(weights_only=True)``. Finding the latest checkpoint skips one with a
truncated or missing file (a warning names it) for the one written before it.

Resharding: :func:`gather_rows` builds a new class range from the old shards that overlap it
(every row-sharded tensor: centres, per-row optimizer state).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile

import torch

from partialfc import dist as pdist
from partialfc.errors import CheckpointError
from partialfc.ops.collectives import all_true, barrier
from partialfc.torch_files import load_plain

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_FILE = "trainer.pt"
ORDER_FILE = "order.pt"  # {"written": n}: the checkpoint's place in the order of writes, 1 + the highest beside it


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def head_file(rank: int) -> str:
    return f"head_rank{rank:05d}.pt"


def _save(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, shared: dict | None, rank_state: dict, keep: int = 0,
                    write_extra=None, rank: int | None = None) -> str:
    """Collective: every rank passes its ``rank_state``; rank 0 also ``shared``. ``rank``
    (default: the world rank) names this rank's file; a search's candidates pass their group
    rank, each into its own ``root``.

    ``write_extra(tmp_dir)`` (called on every rank, e.g. DeepSpeed's own save) writes more
    files into the checkpoint before it is committed. Keeps the ``keep`` newest checkpoints
    (0 = all). Returns the final directory.

    A write that fails on any rank (disk full, quota, I/O error) fails on every rank: the
    ``.tmp-*`` directory is removed, the previous checkpoint and ``latest`` stay as they were,
    and a :class:`CheckpointError` names the directory."""
    rank = pdist.get_rank() if rank is None else rank
    final = os.path.join(root, step_name(step))
    tmp = os.path.join(root, ".tmp-" + step_name(step))

    def start():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def write():
        _save(rank_state, os.path.join(tmp, head_file(rank)))
        if write_extra is not None:
            write_extra(tmp)

    def commit():
        _save(shared, os.path.join(tmp, TRAINER_FILE))
        order = max(map(_write_order, list_checkpoints(root)), default=0) + 1
        _save({"written": order}, os.path.join(tmp, ORDER_FILE))  # a torch file like every file here
        if os.path.exists(final):  # saved again at the same step (e.g. on request)
            shutil.rmtree(final)
        os.replace(tmp, final)

    for phase, everywhere in ((start, False), (write, True), (commit, False)):
        _collectively(phase if everywhere or rank == 0 else None, rank, root, tmp, step)
    if rank == 0:
        _write_text_atomic(os.path.join(root, LATEST), step_name(step) + "\n")
        if keep > 0:  # by write time: after a rollback, higher-numbered steps are the old ones
            written = _by_write_time(root)
            for old in [p for p in written if p != final][:max(len(written) - keep, 0)]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _collectively(phase, rank: int, root: str, tmp: str, step: int) -> None:
    """Run ``phase`` (None: nothing on this rank), then agree over the ranks that it worked
    everywhere; if not, rank 0 removes ``tmp`` and every rank raises :class:`CheckpointError`."""
    failure = None
    try:
        if phase is not None:
            phase()
    except OSError as err:
        failure = err
    if all_true(failure is None):
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    reason = f"{failure}" if failure is not None else "another rank could not write its file (see its message)"
    raise CheckpointError(f"cannot write checkpoint {step_name(step)} in {root}: {reason}; the partial files "
                          "were removed and the previous checkpoint is intact") from None


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")
                   and os.path.exists(os.path.join(root, n, TRAINER_FILE)))
    return [os.path.join(root, n) for n in names]


def _write_order(path: str) -> int:
    """The checkpoint's :data:`ORDER_FILE` number (0 for one written before it existed)."""
    file = os.path.join(path, ORDER_FILE)
    if not os.path.exists(file):
        return 0
    try:
        return int(load_plain(file, "checkpoint order file")["written"])
    except (CheckpointError, KeyError, TypeError, ValueError):  # damaged: ordered with the oldest
        return 0


def _by_write_time(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest written first (after a rollback
    a higher-numbered step can be the older one): by their :data:`ORDER_FILE` numbers, not by
    mtimes, which a coarse file clock makes equal for saves in the same second; checkpoints
    without the number (written by an earlier version) by mtime, before the others."""
    return sorted(list_checkpoints(root),
                  key=lambda p: (_write_order(p), os.path.getmtime(os.path.join(p, TRAINER_FILE))))


def _damage(file: str) -> str | None:
    """Why ``file`` is not a whole ``torch.save`` archive, judged from its zip directory alone
    (cheap at any size: truncation, a missing file, other bytes); None if it looks whole."""
    try:
        size = os.path.getsize(file)
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{info.filename} runs past the end of the file"
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def damaged_file(path: str) -> tuple[str, str] | None:
    """``(file, why)`` for the first file of checkpoint ``path`` that is not whole, or None."""
    heads = sorted(n for n in os.listdir(path) if n.startswith("head_rank") and n.endswith(".pt"))
    expected = [head_file(r) for r in range(len(heads))]
    if heads != expected:
        missing = sorted(set(expected) - set(heads)) or [head_file(len(heads))]
        return os.path.join(path, missing[0]), "missing"
    for name in (TRAINER_FILE, *heads):
        why = _damage(os.path.join(path, name))
        if why is not None:
            return os.path.join(path, name), why
    return None


def _pointed(root: str) -> str | None:
    """The step directory ``latest`` names, if it exists; a pointer naming anything but a
    ``step_*`` directory beside it is refused."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, errors="replace") as f:
        name = f.read().strip()
    if not re.fullmatch(r"step_\d+", name):
        raise CheckpointError(f"{pointer} names {name[:80]!r}, not a step_* directory beside it; remove "
                              "the file to resume from the newest complete checkpoint")
    path = os.path.join(root, name)
    return path if os.path.exists(os.path.join(path, TRAINER_FILE)) else None


def latest_checkpoint(root: str) -> str | None:
    """The directory named by ``latest`` (or the newest complete one), None if there is none.
    A checkpoint with a damaged file (:func:`damaged_file`) is skipped with a warning for the
    one written before it; :class:`CheckpointError` naming the file if none is whole."""
    pointed = _pointed(root)
    by_time = _by_write_time(root)
    candidates = [p for p in [pointed, *reversed(by_time)] if p is not None]
    damaged = []
    for path in dict.fromkeys(candidates):
        if (bad := damaged_file(path)) is None:
            if damaged:
                log.warning("checkpoint file %s is damaged (%s); using the previous complete checkpoint %s",
                            *damaged[0], path)
            return path
        damaged.append(bad)
    if damaged:
        raise CheckpointError(f"no whole checkpoint in {root}: {damaged[0][0]} is damaged ({damaged[0][1]})")
    return None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a step directory or a ``checkpoints`` root / run dir."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(candidate, TRAINER_FILE)):
            return candidate
        found = latest_checkpoint(candidate) if os.path.isdir(candidate) else None
        if found:
            return found
    raise CheckpointError(f"no complete checkpoint at {path} (expected {TRAINER_FILE} in a step_* directory)")


def load_shared(path: str) -> dict:
    return load_plain(os.path.join(path, TRAINER_FILE))


def load_rank_file(path: str, rank: int) -> dict:
    return load_plain(os.path.join(path, head_file(rank)))


def gather_rows(read_rows, shards: list[tuple[int, int]], start: int, count: int) -> dict:
    """Rows ``[start, start + count)`` of row-sharded state, assembled from the saved shards.

    ``shards[r] = (class_start, num_local)`` of old rank ``r``; ``read_rows(r)`` gives that
    rank's rows ``{component: {name: (num_local, ...)}}``. Returns the same nesting with
    ``(count, ...)`` tensors; rows of a shard that had no such tensor yet (e.g. optimizer state
    before its first step) are zeros, and a tensor no shard has is left out."""
    pieces: list[tuple[int, int, dict]] = []
    for old_rank, (lo, n) in enumerate(shards):
        a, b = max(lo, start), min(lo + n, start + count)
        if a < b or (count == 0 and not pieces):  # a rank owning no class still learns the row shapes
            pieces.append((a - start, max(b - a, 0), read_rows(old_rank), a - lo))
    if not pieces:
        raise CheckpointError(f"no saved shard covers classes [{start}, {start + count})")
    out: dict = {}
    for at, n, rows, offset in pieces:
        for component, tensors in rows.items():
            for name, value in tensors.items():
                dest = out.setdefault(component, {})
                if name not in dest:
                    dest[name] = torch.zeros((count, *value.shape[1:]), dtype=value.dtype)
                dest[name][at:at + n] = value[offset:offset + n]
    return out
