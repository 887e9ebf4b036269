"""From raw photos to aligned 112x112 faces: detectors with five landmarks (:mod:`faces`),
the similarity warp onto the ArcFace template (:mod:`template`), photo loading
(:mod:`photos`) and the folder pipeline behind ``partialfc data align`` (:mod:`pipeline`)."""

from partialfc.align.faces import Detector, Face, build_detector, list_detectors, register_detector
from partialfc.align.template import ARCFACE_TEMPLATE, FACE_SIZE, similarity_transform, warp_face

__all__ = ["ARCFACE_TEMPLATE", "Detector", "FACE_SIZE", "Face", "build_detector", "list_detectors",
           "register_detector", "similarity_transform", "warp_face"]
