"""The five-point warp (``partialfc.align.template``) against references written here: a float64
least-squares similarity fit (``np.linalg.lstsq`` on x' = a x - b y + tx, y' = b x + a y + ty)
and OpenCV's ``cv2.warpAffine`` (bilinear, black outside), on smooth high-contrast textures made
here. Pixel-centre convention of both: pixel (i, j) is centred at x = i, y = j."""

from __future__ import annotations

import cv2  # in the dev extra: the independent warp reference
import numpy as np
import pytest
from PIL import Image

from partialfc.align.template import ARCFACE_TEMPLATE, FACE_SIZE, similarity_transform, warp_face

TEMPLATE_IOD = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))  # ~35.2 px


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity minimising sum |M src - dst|^2, by linear least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, np.float64), np.asarray(dst, np.float64)):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def mapped(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def texture(height: int, width: int, seed: int, sigma: float = 2.0) -> np.ndarray:
    """Blurred Gaussian noise stretched to a high contrast (std ~70 grey levels), uint8 RGB."""
    noise = np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
    blurred = (blurred - blurred.mean()) / blurred.std()
    return np.clip(128 + 70 * blurred, 0, 255).round().astype(np.uint8)


def face_points(iod: float, degrees: float, centre, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """The template's five points as a face with inter-ocular distance ``iod``, turned by
    ``degrees``, centred at ``centre``, each point moved by up to ``jitter`` px."""
    t = np.deg2rad(degrees)
    rotation = iod / TEMPLATE_IOD * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    points = (ARCFACE_TEMPLATE - FACE_SIZE / 2) @ rotation.T + np.asarray(centre, np.float64)
    return points + np.random.default_rng(seed).uniform(-jitter, jitter, points.shape)


def opencv_crop(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    matrix = lstsq_similarity(points, ARCFACE_TEMPLATE)
    return cv2.warpAffine(image, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def source_coordinates(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each crop pixel's centre comes from in the photo."""
    inverse = cv2.invertAffineTransform(matrix)
    y, x = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE].astype(np.float64)
    return inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2], inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]


def interior(points: np.ndarray, shape, margin: int = 3, edge: float = 1.0) -> np.ndarray:
    """Crop pixels away from the crop's border whose source lies at least ``edge`` px inside the photo."""
    sx, sy = source_coordinates(lstsq_similarity(points, ARCFACE_TEMPLATE))
    mask = (sx >= edge) & (sx <= shape[1] - 1 - edge) & (sy >= edge) & (sy <= shape[0] - 1 - edge)
    mask[:margin] = mask[-margin:] = False
    mask[:, :margin] = mask[:, -margin:] = False
    return mask


# --- the similarity fit -------------------------------------------------------------------

@pytest.mark.parametrize("a, b, tx, ty", [(1.0, 0.0, 0.0, 0.0), (0.8, 0.6, -12.5, 40.25), (-0.31, 0.02, 100.0, -3.0),
                                          (-2.0, 0.0, 7.0, 9.0), (0.05, -3.7, -250.0, 1e3)])
def test_similarity_transform_recovers_a_known_similarity(a, b, tx, ty):
    known = np.array([[a, -b, tx], [b, a, ty]])
    src = np.random.default_rng(int(abs(a * 100))).uniform(-80, 300, (5, 2))
    fitted = similarity_transform(src, mapped(known, src))
    assert fitted.dtype == np.float64 and fitted.shape == (2, 3)
    np.testing.assert_allclose(fitted, known, rtol=0, atol=1e-9 * max(1.0, np.abs(known).max()))


@pytest.mark.parametrize("seed", range(6))
def test_similarity_transform_is_the_least_squares_similarity(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, (int(rng.integers(2, 9)), 2))
    dst = rng.uniform(-50, 150, src.shape)  # no similarity maps these exactly
    if seed % 2:
        dst = src * [-1.0, 1.0] + rng.normal(0, 2, src.shape)  # nearly a mirror image: no reflection allowed
    fitted, reference = similarity_transform(src, dst), lstsq_similarity(src, dst)
    np.testing.assert_allclose(fitted, reference, rtol=0, atol=1e-9 * max(1.0, np.abs(reference).max()))
    assert np.isclose(fitted[0, 0], fitted[1, 1], rtol=0, atol=1e-12) and \
        np.isclose(fitted[0, 1], -fitted[1, 0], rtol=0, atol=1e-12)  # a similarity, not any affine map
    residual = ((mapped(fitted, src) - dst) ** 2).sum()
    for direction in np.eye(4):  # any other similarity fits worse
        for step in (1e-3, -1e-3):
            a, b, tx, ty = np.array([fitted[0, 0], fitted[1, 0], *fitted[:, 2]]) + step * direction
            other = np.array([[a, -b, tx], [b, a, ty]])
            assert ((mapped(other, src) - dst) ** 2).sum() > residual


def test_similarity_transform_rejects_degenerate_points():
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError):
        similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))


@pytest.mark.parametrize("iod, degrees, jitter", [(24.0, 10.0, 0.0), (55.0, -40.0, 1.0), (40.0, 180.0, 1.5)])
def test_the_fitted_points_land_on_the_template(iod, degrees, jitter):
    points = face_points(iod, degrees, (150.0, 120.0), jitter, seed=int(iod))
    landed = mapped(similarity_transform(points, ARCFACE_TEMPLATE), points)
    error = np.linalg.norm(landed - ARCFACE_TEMPLATE, axis=1)
    # a jitter of j photo px is at most j * TEMPLATE_IOD / iod * sqrt(2) crop px from where it belongs
    assert error.max() <= max(1e-9, 2 * jitter * TEMPLATE_IOD / iod)
    if jitter:
        exact = lstsq_similarity(points, ARCFACE_TEMPLATE)
        np.testing.assert_allclose(landed, mapped(exact, points), atol=1e-9)


# --- the warp against cv2.warpAffine ------------------------------------------------------

WARPS = {  # name: (inter-ocular distance px, degrees, face centre, jitter)
    "upright": (35.0, 0.0, (160.0, 120.0), 0.0),
    "rotated": (45.0, 25.0, (170.0, 130.0), 0.0),
    "small": (20.0, -15.0, (140.0, 110.0), 0.7),
    "large": (70.0, 8.0, (160.0, 120.0), 0.0),
    "shifted past the edge": (40.0, -30.0, (25.0, 215.0), 0.0),
    "upside down": (50.0, 180.0, (150.0, 115.0), 1.0),
    "upside down, turned": (30.0, 160.0, (190.0, 90.0), 0.0),
}


@pytest.mark.parametrize("name", list(WARPS))
@pytest.mark.parametrize("as_pil", [False, True], ids=["array", "pil"])
def test_warp_face_matches_opencv_warp_affine(name, as_pil):
    iod, degrees, centre, jitter = WARPS[name]
    image = texture(240, 320, seed=len(name))
    points = face_points(iod, degrees, centre, jitter, seed=3)
    crop = warp_face(Image.fromarray(image) if as_pil else image, points)
    assert crop.shape == (FACE_SIZE, FACE_SIZE, 3) and crop.dtype == np.uint8
    reference = opencv_crop(image, points)
    mask = interior(points, image.shape)
    assert mask.sum() > (0.3 if "edge" in name else 0.8) * FACE_SIZE ** 2  # the comparison covers the face
    diff = np.abs(crop.astype(int) - reference.astype(int)).max(-1)[mask]
    assert (diff <= 1).mean() >= 0.999, np.bincount(diff)
    # outside the photo (beyond the half pixel bilinear sampling may reach) the crop is black
    sx, sy = source_coordinates(lstsq_similarity(points, ARCFACE_TEMPLATE))
    outside = (sx < -1) | (sx > image.shape[1]) | (sy < -1) | (sy > image.shape[0])
    assert (outside.sum() > 500) == ("edge" in name)
    assert (crop[outside] == 0).all()


def test_warp_face_crop_size_scales_the_template():
    image = texture(240, 320, seed=11)
    points = face_points(35.0, 12.0, (160.0, 120.0))
    size = 224
    crop = warp_face(image, points, size=size)
    matrix = lstsq_similarity(points, ARCFACE_TEMPLATE * size / FACE_SIZE)
    reference = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    diff = np.abs(crop.astype(int) - reference.astype(int)).max(-1)[8:-8, 8:-8]
    assert crop.shape == (size, size, 3) and (diff <= 1).mean() >= 0.999


# --- faces more than twice the crop's scale: box-reduced first ---------------------------

@pytest.mark.parametrize("factor, photo_px_per_crop_px, degrees", [(2, 2.4, -100.0), (3, 3.3, 15.0), (4, 4.6, 180.0)])
def test_a_large_face_is_area_reduced_then_warped(factor, photo_px_per_crop_px, degrees):
    """Reference: the photo area-averaged by the integer factor (cv2.INTER_AREA; exact box means
    as the factor divides the photo's size), then warpAffine with the points moved to the
    reduced photo's pixel centres."""
    image = texture(600, 720, seed=factor, sigma=6.0)
    points = face_points(photo_px_per_crop_px * TEMPLATE_IOD, degrees, (370.0, 300.0))
    crop = warp_face(image, points)
    reduced = cv2.resize(image, (720 // factor, 600 // factor), interpolation=cv2.INTER_AREA)
    reference = opencv_crop(reduced, (points + 0.5) / factor - 0.5)
    diff = np.abs(crop.astype(int) - reference.astype(int))
    assert diff.mean() < 3.0 and (diff <= 3).mean() > 0.99


@pytest.mark.parametrize("photo_px_per_crop_px, degrees", [(2.2, 0.0), (3.6, 33.0), (4.5, 10.0)])
def test_a_large_face_crop_is_not_aliased(photo_px_per_crop_px, degrees):
    """On pixel-level noise (all frequencies up to Nyquist), sampling the photo without a
    prefilter aliases; the crop must be much nearer the photo area-resampled to the crop's scale."""
    rng = np.random.default_rng(int(photo_px_per_crop_px * 10))
    image = np.repeat(rng.integers(0, 2, (600, 720, 1), dtype=np.uint8) * 255, 3, axis=2)
    points = face_points(photo_px_per_crop_px * TEMPLATE_IOD, degrees, (360.0, 300.0))
    crop = warp_face(image, points)
    naive = opencv_crop(image, points)
    small = cv2.resize(image, None, fx=1 / photo_px_per_crop_px, fy=1 / photo_px_per_crop_px,
                       interpolation=cv2.INTER_AREA)
    sx, sy = small.shape[1] / image.shape[1], small.shape[0] / image.shape[0]
    ideal = opencv_crop(small, (points + 0.5) * [sx, sy] - 0.5).astype(np.float64)
    crop_error, naive_error = np.abs(crop - ideal).mean(), np.abs(naive - ideal).mean()
    assert crop_error < 0.5 * naive_error, (crop_error, naive_error)
    assert crop.std() < 0.6 * naive.std()  # aliased noise keeps nearly the full contrast
