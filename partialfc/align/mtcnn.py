"""MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multitask Cascaded
Convolutional Networks", IEEE SPL 2016): face boxes and five landmarks, with the weights that
ship inside the ``facenet-pytorch`` wheel (P-, R- and O-Net, 2 MB).

Only the weight files are used (read with ``torch.load(weights_only=True)``): the package's
own code imports torchvision, which a CPU build of torch cannot load from the registries.
Install with ``pip install --no-deps facenet-pytorch`` (its pins predate torch 2.3).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from partialfc.align.faces import Face, faces_from_arrays, register_detector
from partialfc.align.nms import nms
from partialfc.errors import ConfigError

INSTALL = "pip install --no-deps 'facenet-pytorch>=2.5'"


def _layers(*spec) -> dict[str, nn.Module]:
    """``("conv1", 3, 10, 3), ("pool1", 2, 2)``-style specs -> named modules, each conv
    followed by its PReLU."""
    layers = {}
    for name, *args in spec:
        if name.startswith("conv"):
            layers[name] = nn.Conv2d(args[0], args[1], args[2])
            layers["prelu" + name[4:]] = nn.PReLU(args[1])
        elif name.startswith("pool"):
            layers[name] = nn.MaxPool2d(args[0], args[1], ceil_mode=True)
        else:  # dense with PReLU
            layers[name] = nn.Linear(args[0], args[1])
            layers["prelu" + name[5:]] = nn.PReLU(args[1])
    return layers


class _Stage(nn.Module):
    """A trunk of conv/pool/dense layers and linear heads: face probability (softmax of 2),
    box regression (4) and, for the O-Net, landmarks (10: five x then five y)."""

    def __init__(self, trunk: dict[str, nn.Module], heads: dict[str, nn.Module], dense_from: int | None):
        super().__init__()
        for name, module in {**trunk, **heads}.items():
            self.add_module(name, module)
        self.trunk, self.heads, self.dense_from = list(trunk), list(heads), dense_from

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        for i, name in enumerate(self.trunk):
            if i == self.dense_from:  # the weights were converted from a channels-last flatten
                x = x.permute(0, 3, 2, 1).reshape(len(x), -1)
            x = getattr(self, name)(x)
        outs = [getattr(self, name)(x) for name in self.heads]
        outs[0] = outs[0].softmax(1)[:, 1]
        return outs


def _pnet() -> _Stage:
    return _Stage(_layers(("conv1", 3, 10, 3), ("pool1", 2, 2), ("conv2", 10, 16, 3), ("conv3", 16, 32, 3)),
                  {"conv4_1": nn.Conv2d(32, 2, 1), "conv4_2": nn.Conv2d(32, 4, 1)}, None)


def _rnet() -> _Stage:
    return _Stage(_layers(("conv1", 3, 28, 3), ("pool1", 3, 2), ("conv2", 28, 48, 3), ("pool2", 3, 2),
                          ("conv3", 48, 64, 2), ("dense4", 576, 128)),
                  {"dense5_1": nn.Linear(128, 2), "dense5_2": nn.Linear(128, 4)}, 8)


def _onet() -> _Stage:
    return _Stage(_layers(("conv1", 3, 32, 3), ("pool1", 3, 2), ("conv2", 32, 64, 3), ("pool2", 3, 2),
                          ("conv3", 64, 64, 3), ("pool3", 2, 2), ("conv4", 64, 128, 2), ("dense5", 1152, 256)),
                  {"dense6_1": nn.Linear(256, 2), "dense6_2": nn.Linear(256, 4), "dense6_3": nn.Linear(256, 10)}, 11)


def weights_dir() -> Path:
    """The folder of ``pnet.pt``, ``rnet.pt``, ``onet.pt`` inside the installed facenet-pytorch
    (found without importing it)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    folder = Path(next(iter(spec.submodule_search_locations)), "data") if spec and spec.submodule_search_locations \
        else None
    if folder is None or not (folder / "onet.pt").is_file():
        raise ConfigError(f"detector mtcnn needs the MTCNN weights of facenet-pytorch, which is not installed; "
                          f"install it with: {INSTALL}")
    return folder


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes ``(N, 4)`` made square around their centres (side: the longer one)."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    return boxes + offsets * size


class MTCNN:
    """``detect(image)``: faces of at least ``min_size`` pixels, found by the P-Net over an
    image pyramid (scale step ``factor``), refined by the R-Net and the O-Net, which also places
    the five points; ``thresholds``: the face probability each stage requires."""

    confident = 0.95  # on celeba_wild 99% of chosen faces score above; torsos and prints 0.72-0.93

    def __init__(self, min_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709):
        folder = weights_dir()
        self.stages = []
        for build, name in ((_pnet, "pnet"), (_rnet, "rnet"), (_onet, "onet")):
            net = build()
            net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
            self.stages.append(net.eval())
        self.min_size, self.thresholds, self.factor = min_size, thresholds, factor

    def _proposals(self, image: torch.Tensor) -> np.ndarray:
        """Stage 1: ``(N, 5)`` boxes (edges) and scores from the P-Net's 12x12 windows, stride 2:
        non-maximum suppression per scale and across scales on the windows, then their regression."""
        h, w = image.shape[-2:]
        found = []
        scale = 12.0 / self.min_size
        while min(h, w) * scale >= 12:
            resized = F.interpolate(image, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            prob, offsets = self.stages[0](_normalise(resized))
            rows, cols = np.nonzero(prob[0].numpy() >= self.thresholds[0])
            if len(rows):  # the 12x12 windows, suppressed as they are, then moved by their regression
                boxes = np.stack([2 * cols, 2 * rows, 2 * cols + 12, 2 * rows + 12], 1) / scale
                scores = prob[0].numpy()[rows, cols]
                keep = nms(boxes, scores, 0.5)
                found.append(np.column_stack([boxes[keep], scores[keep], offsets[0].numpy()[:, rows, cols].T[keep]]))
            scale *= self.factor
        if not found:
            return np.zeros((0, 5))
        found = np.concatenate(found)
        found = found[nms(found[:, :4], found[:, 4], 0.7)]
        return np.column_stack([_regress(found[:, :4], found[:, 5:]), found[:, 4]])

    @staticmethod
    def _crops(image: torch.Tensor, boxes: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
        """``(N, 3, size, size)`` crops of the integer boxes (zero outside the image), and
        those boxes ``(N, 4)``: pixel columns ``x1..x2-1``, rows ``y1..y2-1``."""
        h, w = image.shape[-2:]
        grid = np.round(boxes[:, :4]).astype(np.int64)
        grid[:, 2:] = np.maximum(grid[:, 2:], grid[:, :2] + 1)
        crops = []
        for x1, y1, x2, y2 in grid:
            patch = image.new_zeros(1, 3, y2 - y1, x2 - x1)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            if sx1 < sx2 and sy1 < sy2:
                patch[..., sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[..., sy1:sy2, sx1:sx2]
            crops.append(F.interpolate(patch, size=(size, size), mode="area"))
        return _normalise(torch.cat(crops)), grid.astype(np.float64)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of ``image``, computed on one CPU thread: the networks are too small to gain from
        more, and several threads on a loaded machine ran 10x slower (parallelism comes from
        processes, ``data align --workers``)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._detect(image)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _detect(self, image: np.ndarray) -> list[Face]:
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        boxes = self._proposals(pixels)
        # stage 2: refine the squared proposals at 24x24
        if len(boxes):
            squares = _square(boxes[:, :4])
            crops, _ = self._crops(pixels, squares, 24)
            prob, offsets = (t.numpy() for t in self.stages[1](crops))
            passed = prob >= self.thresholds[1]
            squares, prob, offsets = squares[passed], prob[passed], offsets[passed]
            keep = nms(squares, prob, 0.7)
            boxes = np.column_stack([_square(_regress(squares[keep], offsets[keep])), prob[keep]])
        if not len(boxes):
            return []
        # stage 3: boxes and five points at 48x48
        crops, grid = self._crops(pixels, boxes[:, :4], 48)
        prob, offsets, marks = (t.numpy() for t in self.stages[2](crops))
        keep = prob >= self.thresholds[2]
        grid, prob, offsets, marks = grid[keep], prob[keep], offsets[keep], marks[keep]
        size = np.stack([grid[:, 2] - grid[:, 0], grid[:, 3] - grid[:, 1]], 1)
        points = np.stack([marks[:, :5], marks[:, 5:]], 2) * size[:, None] + grid[:, None, :2]
        boxes = _regress(grid, offsets)
        keep = nms(boxes, prob, 0.7, by="min")
        return faces_from_arrays(boxes[keep], points[keep], prob[keep])


@register_detector("mtcnn")
def mtcnn(min_size: int = 20, factor: float = 0.709) -> MTCNN:
    """MTCNN with facenet-pytorch's packaged weights (``pip install --no-deps facenet-pytorch``)."""
    return MTCNN(min_size=min_size, factor=factor)
