"""The 112x112 ArcFace template and the five-point similarity warp onto it.

Coordinates are in pixels with pixel ``(i, j)``'s centre at ``x = i, y = j`` (OpenCV's and
insightface's convention). Points are ``(5, 2)``: left eye centre, right eye centre, nose tip,
left mouth corner, right mouth corner, "left" as seen in the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# insightface's arcface_src: where the five points of an aligned 112x112 face lie
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
FACE_SIZE = 112


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` similarity (rotation, uniform scale, shift; no reflection) that maps the
    points ``src`` ``(N, 2)`` onto ``dst`` ``(N, 2)`` with the least squared error: Umeyama's
    closed form (IEEE TPAMI 13(4), 1991), in float64."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N>=2, 2) point sets of one shape, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (src_c ** 2).sum() / len(src)
    if variance <= 0:
        raise ValueError("the source points coincide")
    scale = (d * sign).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` ``(N, 2)`` mapped by the ``(2, 3)`` affine ``matrix``."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def warp_face(image: np.ndarray | Image.Image, points: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The aligned ``(size, size, 3)`` uint8 crop of the face whose five ``points`` (in
    ``image``'s pixels) are given: the similarity fit onto :data:`ARCFACE_TEMPLATE` (scaled to
    ``size``), bilinear sampling, black outside the photo. A face more than twice the crop's
    scale is first box-reduced by an integer factor, so the crop is not aliased."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    im = im.convert("RGB")
    points = np.asarray(points, np.float64)
    matrix = similarity_transform(points, ARCFACE_TEMPLATE * (size / FACE_SIZE))
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor > 1:  # box filter first: reduced pixel j covers source pixels [j*f, j*f + f)
        im = im.reduce(factor)
        matrix = similarity_transform((points + 0.5) / factor - 0.5, ARCFACE_TEMPLATE * (size / FACE_SIZE))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    # Pillow samples output pixel centres at (i + 0.5, j + 0.5) and input pixels with
    # centres at +0.5 too: shift by half a pixel on both sides of the map
    linear = inverse[:, :2]
    shift = inverse[:, 2] + 0.5 - linear @ np.array([0.5, 0.5])
    coeffs = (linear[0, 0], linear[0, 1], shift[0], linear[1, 0], linear[1, 1], shift[1])
    return np.asarray(im.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0)))
