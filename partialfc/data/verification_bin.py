"""Verification sets in the InsightFace ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images
(JPEG/PNG bytes, or uint8 numpy arrays of those bytes), pairwise consecutive; ``issame_list``
holds ``P`` booleans. Old files are Python-2 pickles, hence ``encoding="bytes"``.
"""

from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from partialfc.data.images import decode_image
from partialfc.errors import InputNotFoundError, VerificationBinError


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``2 * len(issame)`` encoded images and the pair labels, atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need 2 per pair)")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)
    os.replace(tmp, path)


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """``(encoded images (2P), issame bool (P,))`` from a ``.bin`` file (Python 2 or 3 pickle)."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"verification set {path} not found")
    with open(path, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    images = [b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bins]
    issame = np.asarray(issame, dtype=bool)
    if len(images) != 2 * len(issame):
        raise VerificationBinError(f"{path}: {len(images)} images for {len(issame)} pairs (need 2 per pair)")
    return images, issame


def load_bin_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Decoded pairs: uint8 ``(2P, 3, H, W)`` RGB and issame bool ``(P,)``."""
    images, issame = read_bin(path)
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data))
        except (OSError, ValueError) as e:
            raise VerificationBinError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: {e}") from None
    return np.stack(decoded).transpose(0, 3, 1, 2).copy(), issame


def read_lfw_pairs(images_dir: str | os.PathLike, pairs_txt: str | os.PathLike) -> tuple[list[str], list[bool]]:
    """Image paths ``(2P,)`` and issame ``(P,)`` of an LFW ``pairs.txt``: an optional header line
    (``folds pairs`` or one count), then ``name i j`` (same person) or ``name1 i name2 j``, image
    ``i`` of ``name`` being ``images_dir/name/name_000i.jpg``."""
    if not os.path.isfile(pairs_txt):
        raise InputNotFoundError(f"pairs file {pairs_txt} not found")
    paths, issame = [], []
    with open(pairs_txt) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or (number == 1 and all(x.isdigit() for x in fields)):
                continue
            if len(fields) == 3:
                fields = [fields[0], fields[1], fields[0], fields[2]]
            elif len(fields) != 4:
                raise VerificationBinError(f"{pairs_txt}:{number}: expected 'name i j' or 'name1 i name2 j'")
            for name, index in (fields[:2], fields[2:]):
                paths.append(os.path.join(images_dir, name, f"{name}_{int(index):04d}.jpg"))
            issame.append(fields[0] == fields[2])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputNotFoundError(f"{len(missing)} images of {pairs_txt} not found, e.g. {missing[0]}")
    return paths, issame


def make_bin(images_dir: str | os.PathLike, pairs_txt: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the pairs of an LFW ``pairs.txt`` as a ``.bin`` (the image files' bytes as they
    are); returns the number of pairs."""
    paths, issame = read_lfw_pairs(images_dir, pairs_txt)
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(f.read())
    write_bin(out, images, issame)
    return len(issame)
