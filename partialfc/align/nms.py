"""Greedy non-maximum suppression of boxes (numpy; torchvision's is not importable with every
torch build)."""

from __future__ import annotations

import numpy as np


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, by: str = "union") -> np.ndarray:
    """Indices of the boxes kept, best score first: each box, in order of decreasing score,
    suppresses the later ones whose overlap with it exceeds ``threshold``. ``boxes`` ``(N, 4)``
    x1, y1, x2, y2 (edges); overlap is intersection over union, or over the smaller box's
    area when ``by="min"``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if by == "min" else area[i] + area[rest] - inter
        overlap = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)
