"""Five points per photo from a file instead of a detector: ``path x1 y1 ... x5 y5`` per line
(left eye, right eye, nose tip, left and right mouth corner, in the upright photo's pixels),
the path (spaces allowed) relative to the photo folder or absolute; ``#`` starts a comment. The layout of the
landmark lists of CelebA, CFP and insightface's ``.lst`` files once reduced to five points."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from partialfc.errors import InputError, InputNotFoundError


def _key(path: str | Path, root: str | Path) -> str:
    """Absolute, so a relative root or photo path matches the same photo named absolutely."""
    return os.path.abspath(os.path.join(root, path))


class LandmarksFile:
    """The points of a landmarks file; ``points(path)`` ``(5, 2)`` or ``None`` for a photo the
    file does not list (``path``: the photo's path as it is opened). ``root``: the folder the
    file's relative paths are relative to."""

    def __init__(self, path: str | Path, root: str | Path):
        if not os.path.isfile(path):
            raise InputNotFoundError(f"landmarks file {path} not found")
        self.path, self._points = str(path), {}
        with open(path, encoding="utf-8", errors="surrogateescape") as f:  # names as os.scandir gives them
            for number, line in enumerate(f, 1):
                fields = line.split("#", 1)[0].strip().rsplit(None, 10)  # the path may hold spaces
                if not fields:
                    continue
                if len(fields) != 11:
                    raise InputError(f"{path}:{number}: expected 'path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5', "
                                     f"got {len(fields)} fields")
                try:
                    values = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
                except ValueError:
                    raise InputError(f"{path}:{number}: the ten coordinates must be numbers") from None
                if not np.isfinite(values).all():
                    raise InputError(f"{path}:{number}: the ten coordinates must be finite")
                self._points[_key(fields[0], root)] = values

    def points(self, photo: str | Path) -> np.ndarray | None:
        return self._points.get(os.path.abspath(photo))
