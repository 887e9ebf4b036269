"""dlib's HOG frontal-face detector with its 68-point shape predictor, reduced to five points
(eye centres as the mean of each eye's six contour points, nose tip, mouth corners).

The detector is built into dlib (``pip install dlib-bin``); the predictor's weights come from
Debian's ``libdlib-data`` (``/usr/share/dlib/shape_predictor_68_face_landmarks.dat``) or a
path given as ``model=``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from partialfc.align.faces import Face, faces_from_arrays, register_detector
from partialfc.errors import ConfigError, InputNotFoundError
from partialfc.extras import require

PREDICTOR = "/usr/share/dlib/shape_predictor_68_face_landmarks.dat"  # Debian's libdlib-data
LEFT_EYE, RIGHT_EYE, NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = slice(36, 42), slice(42, 48), 30, 48, 54


def five_points(shape: np.ndarray) -> np.ndarray:
    """The five points ``(5, 2)`` of a 68-point (iBUG 300-W) shape ``(68, 2)``."""
    return np.stack([shape[LEFT_EYE].mean(0), shape[RIGHT_EYE].mean(0), shape[NOSE_TIP], shape[MOUTH_LEFT],
                     shape[MOUTH_RIGHT]])


class DlibDetector:
    """``detect(image)``: HOG detections (the image upsampled ``upsample`` times first, to find
    faces down to about 40 / 2**upsample pixels) with a score above ``threshold``."""

    def __init__(self, model: str | None = None, upsample: int = 1, threshold: float = 0.0):
        dlib = require("dlib", "detector dlib")
        path = Path(model or PREDICTOR)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: no dlib 68-point shape predictor there; install Debian's libdlib-data "
                                     "or pass its path")
        try:
            self.predictor = dlib.shape_predictor(str(path))
        except RuntimeError as err:
            raise ConfigError(f"{path}: not a dlib shape predictor ({err})") from None
        self.detector, self.upsample, self.threshold = dlib.get_frontal_face_detector(), upsample, threshold
        self.min_size = 80 / 2 ** upsample  # the HOG window is 80 px
        self._rectangle = dlib.rectangle

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        rects, scores, _ = self.detector.run(image, self.upsample, self.threshold)
        if not rects:
            return []
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float64)
        points = np.stack([five_points(np.array([(p.x, p.y) for p in self.predictor(image, r).parts()], np.float64))
                           for r in rects])
        return faces_from_arrays(boxes, points, np.asarray(scores))


@register_detector("dlib")
def dlib_detector(model: str | None = None, upsample: int = 1, threshold: float = 0.0) -> DlibDetector:
    """dlib's HOG detector; ``model``: the 68-point predictor (default: Debian's)."""
    return DlibDetector(model, upsample, threshold)
