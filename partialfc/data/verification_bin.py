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
