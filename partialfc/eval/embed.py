"""Embeddings of image files: ``partialfc embed`` (files or folders -> ``.npy``)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from partialfc.data.images import IMAGE_SIZE
from partialfc.data.tools import IMAGE_SUFFIXES
from partialfc.errors import InputNotFoundError
from partialfc.eval.verification import LazyFaces, embed_images


def list_images(inputs: list[str]) -> list[str]:
    """The image files named in ``inputs`` and, sorted, those below each folder."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                            if f.lower().endswith(tuple(IMAGE_SUFFIXES)))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise InputNotFoundError(f"{item} not found")
    return paths


class ImageFiles(LazyFaces):
    """Image files (``items``: paths) decoded only when a slice becomes an array; other sizes
    resized to 112x112 (crops should be aligned)."""

    def face(self, path: str) -> np.ndarray:
        with Image.open(path) as image:
            face = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(face).transpose(2, 0, 1)


def embed_files(model: torch.nn.Module, paths: list[str], batch_size: int = 128,
                device: str | torch.device = "cpu", flip: bool = True) -> np.ndarray:
    """float32 ``(len(paths), D)`` L2-normalised embeddings (flip test unless ``flip=False``)."""
    return embed_images(model, ImageFiles(paths), batch_size=batch_size, device=device, flip=flip).numpy()
