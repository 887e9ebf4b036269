"""``partialfc data prepare RAW OUT``: a folder of raw photos to a training set and its
held-out evaluation, in one command.

1. align every photo into ``OUT/aligned`` (:func:`~partialfc.align.pipeline.align_folder`,
   resumable);
2. hold out ``val_identities`` identities (chosen at random among those with two or more
   aligned faces) and write ``pairs`` verification pairs of them, half of one person and half
   of two, to ``OUT/val.bin`` (and which faces they are to ``OUT/val_pairs.tsv``: crop, crop,
   1 or 0 for same or not, the crops relative to ``OUT/aligned``);
3. pack the other identities' faces into a shuffled ``OUT/train.rec/.idx`` (class names in
   ``OUT/train.names``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partialfc.align.pipeline import AlignOptions, AlignReport, align_folder
from partialfc.data.tools import pack_identities, shuffle_dataset
from partialfc.data.verification_bin import write_bin
from partialfc.errors import InputError

ALIGNED, TRAIN, VAL, VAL_PAIRS = "aligned", "train", "val.bin", "val_pairs.tsv"


@dataclass
class PrepareResult:
    """What :func:`prepare_photos` wrote."""

    align: AlignReport
    train_prefix: str
    train_images: int
    train_identities: int
    val_bin: str | None
    val_identities: list[str]
    val_pairs: int


def aligned_faces(out_dir: str, crops: list[str]) -> dict[str, list[str]]:
    """``{identity: sorted crop paths}`` of ``crops`` (relative to ``out_dir``, the first folder
    naming the identity): the faces of the photos the source holds now, not every file an
    earlier run left behind (a photo moved to another person would count twice)."""
    faces: dict[str, list[str]] = {}
    for crop in crops:
        faces.setdefault(crop.split("/", 1)[0], []).append(os.path.join(out_dir, crop))
    return {identity: sorted(paths) for identity, paths in sorted(faces.items())}


def sample_pairs(faces: dict[str, list[str]], pairs: int, rng: np.random.Generator) -> list[tuple[str, str, bool]]:
    """``pairs`` distinct ``(photo, photo, same)`` in random order: half of one identity (two
    different photos; the identity drawn first, uniformly, so a person with many photos does
    not fill the set), half of two different identities; fewer when the faces do not allow as
    many."""
    names = sorted(faces)
    several = [n for n in names if len(faces[n]) >= 2]
    chosen: dict[bool, set] = {True: set(), False: set()}
    for same, wanted in ((True, pairs // 2), (False, pairs - pairs // 2)):
        for _ in range(50 * wanted):
            if len(chosen[same]) == wanted or same and not several:
                break
            if same:
                person = faces[several[rng.integers(len(several))]]
                a, b = (person[k] for k in rng.choice(len(person), 2, replace=False))
            else:
                a, b = (faces[names[k]][rng.integers(len(faces[names[k]]))]
                        for k in rng.choice(len(names), 2, replace=False))
            chosen[same].add((*sorted((a, b)), same))
    found = sorted(chosen[True]) + sorted(chosen[False])
    return [found[k] for k in rng.permutation(len(found))]  # both kinds in every fold of a 10-fold split


def prepare_photos(raw: str, out: str, options: AlignOptions = AlignOptions(), val_identities: int = 10,
                   pairs: int = 1000, seed: int = 0, workers: int | None = None,
                   progress: bool = True) -> PrepareResult:
    """Steps 1-3 of the module docstring; an :class:`InputError` when too few identities have
    two or more faces to hold ``val_identities`` out and still train on two or more."""
    aligned_dir = os.path.join(out, ALIGNED)
    report = align_folder(raw, aligned_dir, options, workers, progress)
    faces = aligned_faces(aligned_dir, report.crops)
    eligible = [n for n, paths in faces.items() if len(paths) >= 2]
    if val_identities and pairs < 10:
        raise InputError(f"--pairs {pairs}: a 10-fold verification needs 10 or more pairs")
    if val_identities and (val_identities < 2 or val_identities > len(eligible) or len(faces) - val_identities < 2):
        raise InputError(f"--val-identities {val_identities}: need 2 or more, at most the {len(eligible)} identities "
                         f"with two or more aligned faces, and leaving 2 or more of the {len(faces)} to train on "
                         "(0: no held-out set)")
    rng = np.random.default_rng(seed)
    held_out = sorted(str(n) for n in rng.choice(eligible, val_identities, replace=False)) if val_identities else []
    val_bin, num_pairs = None, 0
    if held_out:
        chosen = sample_pairs({n: faces[n] for n in held_out}, pairs, rng)
        images = [Path(p).read_bytes() for a, b, _ in chosen for p in (a, b)]
        val_bin, num_pairs = os.path.join(out, VAL), len(chosen)
        write_bin(val_bin, images, [same for _, _, same in chosen])
        Path(out, VAL_PAIRS).write_text("".join(f"{os.path.relpath(a, aligned_dir)}\t{os.path.relpath(b, aligned_dir)}"
                                                f"\t{int(same)}\n" for a, b, same in chosen),
                                        encoding="utf-8", errors="surrogateescape")
    train = [(name, paths) for name, paths in faces.items() if name not in held_out]
    sorted_prefix, prefix = os.path.join(out, "train.sorted"), os.path.join(out, TRAIN)
    packed = pack_identities(train, sorted_prefix, size=112, workers=workers, progress=progress)
    shuffle_dataset(sorted_prefix, prefix, seed, progress=progress)
    os.replace(sorted_prefix + ".names", prefix + ".names")
    for leftover in Path(out).glob("train.sorted.*"):  # the sorted pack and its label cache
        leftover.unlink()
    return PrepareResult(report, prefix, packed.num_images, packed.num_classes, val_bin, held_out, num_pairs)
