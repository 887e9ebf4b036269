"""What a face detector returns, and the registry that builds one by name.

A detector is any object with ``detect(image) -> list[Face]`` where ``image`` is a uint8 RGB
``(H, W, 3)`` array. Each detector registers a builder where it is defined with
``@register_detector("name")``; :func:`build_detector` imports the detector modules, so
the table is complete, and an optional package is imported only when its detector is built.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from partialfc.errors import ConfigError

# the modules that register detectors (imported by build_detector, not at package import)
DETECTOR_MODULES = ("partialfc.align.mtcnn", "partialfc.align.dlib_detector", "partialfc.align.onnx_detector")


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` ``(4,)`` x1, y1, x2, y2; ``points`` ``(5, 2)`` left eye,
    right eye, nose tip, left and right mouth corners (pixels, centre of pixel (i, j) at
    (i, j)); ``score`` the detector's confidence."""

    box: np.ndarray
    points: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The box's shorter side, in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


class Detector(Protocol):
    """Optionally ``confident``: a score above which a detection is almost surely a face (a
    photo's face is then chosen among those, see ``pipeline.choose_face``)."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face found in the uint8 RGB ``(H, W, 3)`` ``image``."""


Builder = Callable[..., Detector]
DETECTORS: dict[str, Builder] = {}


def register_detector(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(**options)`` buildable as ``build_detector(name, ...)``."""
    def register(builder: Builder) -> Builder:
        if name in DETECTORS:
            raise ValueError(f"detector name {name!r} is already registered to {DETECTORS[name].__name__}")
        DETECTORS[name] = builder
        return builder
    return register


def list_detectors() -> list[str]:
    for module in DETECTOR_MODULES:
        importlib.import_module(module)
    return sorted(DETECTORS)


def build_detector(name: str, **options) -> Detector:
    """The detector registered as ``name``; a :class:`ConfigError` for an unknown name or an
    option the detector does not take."""
    names = list_detectors()
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; available: {', '.join(names)}")
    accepted = inspect.signature(DETECTORS[name]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"detector {name} takes no option {', '.join(unknown)} (it takes: "
                          f"{', '.join(accepted) or 'none'})")
    missing = [p for p, v in accepted.items() if v.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ConfigError(f"detector {name} needs {', '.join(missing)} (--detector-{missing[0]} on the command line)")
    return DETECTORS[name](**options)


def faces_from_arrays(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray) -> list[Face]:
    """``Face`` objects from ``(N, 4)`` boxes, ``(N, 5, 2)`` points and ``(N,)`` scores,
    highest score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [Face(np.asarray(boxes[i], np.float64), np.asarray(points[i], np.float64).reshape(5, 2), float(scores[i]))
            for i in order]
