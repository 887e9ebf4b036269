"""A user's own ONNX face detector with five points, in the output layout of insightface's
SCRFD models (``det_10g.onnx``, ``det_2.5g.onnx``, ``det_500m.onnx``), run by onnxruntime on
the CPU.

The layout: one NCHW float32 RGB input normalised ``(pixel - 127.5) / 128``, with a fixed
``H, W`` or dynamic dims (then ``input_size`` square). The outputs come grouped by kind, one
per feature stride: scores ``(N, 1)``, box distances ``(N, 4)``, keypoint offsets ``(N, 10)``
(each may carry a leading batch dim of 1). 9 outputs: strides 8, 16, 32 with 2 anchors per
location; 15 outputs: strides 8 to 128 with 1 anchor. ``N = (H/s) (W/s) anchors``, locations
row-major, the anchors of one location consecutive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from partialfc.align.faces import Face, faces_from_arrays, register_detector
from partialfc.align.nms import nms as non_max_suppression
from partialfc.errors import ConfigError, InputNotFoundError
from partialfc.extras import require

# number of outputs -> (feature strides, anchors per location), for the layouts with keypoints
LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}
WITHOUT_KEYPOINTS = (6, 10)
WIDTHS = (1, 4, 10)  # last dim of the score, box and keypoint outputs


def anchor_centres(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """``(height * width * anchors, 2)`` x, y centres: location ``(x, y)`` at ``(x s, y s)``,
    row-major (y outer), each repeated ``anchors`` times in a row."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2) * float(stride)
    return np.repeat(centres, anchors, axis=0)


class OnnxDetector:
    """SCRFD-layout detector; :meth:`detect` takes a uint8 RGB ``(H, W, 3)`` photo."""

    def __init__(self, model: str, threshold: float = 0.5, input_size: int = 640, nms: float = 0.4):
        ort = require("onnxruntime", "detector onnx")
        self.model, self.threshold, self.nms = str(model), float(threshold), float(nms)
        if not Path(model).is_file():
            raise InputNotFoundError(f"ONNX detector model {self.model} does not exist")
        try:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = 1  # one core per process: data align --workers parallelises
            self.session = ort.InferenceSession(self.model, session_options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"ONNX detector model {self.model} cannot be loaded: {reason}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or isinstance(shape[1], int) and shape[1] != 3:
            raise ConfigError(f"ONNX detector model {self.model} needs one NCHW input with 3 channels, "
                              f"has {[i.shape for i in inputs]}")
        if len(outputs) in WITHOUT_KEYPOINTS:
            raise ConfigError(f"ONNX detector model {self.model} has {len(outputs)} outputs, an SCRFD layout "
                              "without keypoints; the onnx detector needs five points (9 or 15 outputs)")
        if len(outputs) not in LAYOUTS:
            raise ConfigError(f"ONNX detector model {self.model} has {len(outputs)} outputs; the SCRFD layout "
                              "with keypoints has 9 (strides 8, 16, 32) or 15 (strides 8 to 128)")
        self.strides, self.anchors = LAYOUTS[len(outputs)]
        for index, output in enumerate(outputs):
            last = output.shape[-1] if output.shape else None
            if isinstance(last, int) and last != WIDTHS[index // len(self.strides)]:
                raise ConfigError(f"ONNX detector model {self.model}: output {index} ({output.name}) has shape "
                                  f"{output.shape}, expected last dim {WIDTHS[index // len(self.strides)]}")
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:]
        fixed = isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
        self.size = (height, width) if fixed else (int(input_size), int(input_size))

    def letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The uint8 ``(H, W, 3)`` photo resized keeping its aspect ratio into the top-left of a
        zero ``(size_h, size_w, 3)`` canvas, and ``det_scale = new_height / photo_height``."""
        (rows, cols), (size_h, size_w) = image.shape[:2], self.size
        ratio = rows / cols
        if ratio > size_h / size_w:
            new_h, new_w = size_h, max(1, int(size_h / ratio))
        else:
            new_h, new_w = max(1, int(size_w * ratio)), size_w
        canvas = np.zeros((size_h, size_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        return canvas, new_h / rows

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in the uint8 RGB ``(H, W, 3)`` ``image``, highest score first, in its pixels."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"need a uint8 RGB (H, W, 3) image, got {image.dtype} {image.shape}")
        canvas, det_scale = self.letterbox(image)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        count, boxes, points, scores = len(self.strides), [], [], []
        for index, stride in enumerate(self.strides):
            centres = anchor_centres(self.size[0] // stride, self.size[1] // stride, stride, self.anchors)
            score = np.asarray(outs[index], np.float64).reshape(-1)
            dist = np.asarray(outs[index + count], np.float64).reshape(-1, 4) * stride
            offset = np.asarray(outs[index + 2 * count], np.float64).reshape(-1, 10) * stride
            if not len(score) == len(dist) == len(offset) == len(centres):
                raise ConfigError(f"ONNX detector model {self.model}: stride {stride} gives {len(score)} scores, "
                                  f"{len(dist)} boxes, {len(offset)} keypoint sets for {len(centres)} anchors "
                                  f"at input {self.size[0]}x{self.size[1]}")
            kept = score >= self.threshold
            centre = centres[kept]
            boxes.append(np.concatenate([centre - dist[kept, :2], centre + dist[kept, 2:]], axis=1))
            points.append(centre[:, None, :] + offset[kept].reshape(-1, 5, 2))
            scores.append(score[kept])
        boxes, points = np.concatenate(boxes) / det_scale, np.concatenate(points) / det_scale
        scores = np.concatenate(scores)
        keep = non_max_suppression(boxes, scores, self.nms)
        return faces_from_arrays(boxes[keep], points[keep], scores[keep])


@register_detector("onnx")
def onnx_detector(model: str, threshold: float = 0.5, input_size: int = 640, nms: float = 0.4) -> OnnxDetector:
    """A detector from the SCRFD-layout ONNX file ``model`` (with keypoints): faces scoring at
    least ``threshold``, NMS at IoU ``nms``; ``input_size`` squares a model with dynamic dims."""
    return OnnxDetector(model, threshold=threshold, input_size=input_size, nms=nms)
