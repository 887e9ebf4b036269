"""Verification pairs from raw photos (``partialfc eval verify --pairs PAIRS --images ROOT``):
LFW's ``pairs.txt`` over a folder of unaligned photos, each photo aligned as ``data align``
does. A photo without a usable face is not dropped (that would flatter the score): its
centre square stands in for the face, and the photos this happened to are listed."""

from __future__ import annotations

import numpy as np
from PIL import Image

from partialfc.align.landmarks import LandmarksFile
from partialfc.align.photos import MAX_SIDE, PhotoSkipped, load_photo
from partialfc.align.pipeline import AlignOptions, align_photo
from partialfc.align.template import FACE_SIZE
from partialfc.data.parallel import ordered_map
from partialfc.data.verification_bin import read_lfw_pairs
from partialfc.errors import ImageFileError, InputError

FALLBACK_REASONS = ("no face", "face too small", "no landmarks", "bad landmarks")


def centre_crop(path: str) -> np.ndarray:
    """The photo's centre square (side: its shorter side) at ``FACE_SIZE`` x ``FACE_SIZE``."""
    image, _ = load_photo(path, MAX_SIDE)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR, reducing_gap=2.0))


def _pair_crop(task: tuple[str, AlignOptions, np.ndarray | None]) -> tuple[np.ndarray | None, str]:
    """``(crop, "")``, or ``(centre crop, reason)`` for a photo without a usable face, or
    ``(None, reason)`` for one that cannot be decoded."""
    path, options, points = task
    try:
        return align_photo(path, options, points)[0], ""
    except PhotoSkipped as skipped:
        if skipped.reason in FALLBACK_REASONS:
            return centre_crop(path), str(skipped)
        return None, str(skipped)


def align_pairs(images_dir: str, pairs_txt: str, options: AlignOptions = AlignOptions(), workers: int | None = 1,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """``(images uint8 (2P, 3, 112, 112), issame bool (P,), [(photo, reason), ...] of the
    centre-cropped photos)`` of an LFW ``pairs.txt`` whose image ``i`` of ``name`` is
    ``images_dir/name/name_000i.jpg``. Each distinct photo is aligned once, by the detector or
    by the points of ``options.landmarks`` (paths relative to ``images_dir``)."""
    paths, issame = read_lfw_pairs(images_dir, pairs_txt)
    if not issame:
        raise InputError(f"{pairs_txt}: no pairs (expected 'name i j' or 'name1 i name2 j' lines)")
    unique = sorted(set(paths))
    landmarks = LandmarksFile(options.landmarks, images_dir) if options.landmarks else None
    crops, fallbacks = {}, []
    tasks = [(p, options, None if landmarks is None else landmarks.points(p)) for p in unique]
    results = ordered_map(_pair_crop, tasks, len(tasks), workers, desc="aligning pairs", unit="photo",
                          progress=progress, chunksize=1, start_method="spawn")
    for path, (crop, reason) in zip(unique, results):
        if crop is None:
            raise ImageFileError(f"{path}: {reason}")
        if reason:
            fallbacks.append((path, reason))
        crops[path] = crop
    images = np.stack([crops[p] for p in paths]).transpose(0, 3, 1, 2).copy()
    return images, np.asarray(issame, dtype=bool), fallbacks
