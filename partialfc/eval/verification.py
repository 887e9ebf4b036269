"""Pair verification on ``.bin`` sets (LFW protocol, see docs formats.md).

Embeddings of each image and its horizontal flip are summed, then L2-normalised. 10-fold
cross-validation: on 9 folds the threshold on squared L2 distance (0..4, step 0.01) with the
best accuracy is chosen, and accuracy is measured on the held-out fold. TAR at FAR=1e-3 is
taken over all pairs. Under a process group the images are split over ranks, embedded
locally and gathered, so every rank is busy for the same time and meets the others only in
the final gather.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from partialfc import dist as pdist
from partialfc.data.images import IMAGE_SIZE
from partialfc.data.loader import normalise
from partialfc.data.verification_bin import load_bin_images
from partialfc.ops.collectives import ReduceOp, all_reduce, gather_rows

THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds
    accuracy_std: float
    threshold: float  # mean best threshold (squared L2)
    tar_at_far_1e3: float
    num_pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


class LazyFaces:
    """Faces read only when a slice is turned into an array: ``np.asarray(faces[a:b])`` is
    uint8 ``(b - a, 3, 112, 112)``, row ``r`` being ``face(items[a + r])`` (subclasses)."""

    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, part: slice) -> LazyFaces:
        sliced = copy.copy(self)
        sliced.items = self.items[part]
        return sliced

    def face(self, item) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        faces = np.zeros((len(self), 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for row, item in enumerate(self.items):
            faces[row] = self.face(item)
        return faces if dtype is None else faces.astype(dtype)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128,
                 device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 flip: bool = True) -> torch.Tensor:
    """uint8 ``(N, 3, 112, 112)`` -> float32 ``(N, D)``: normalised ``f(x) + f(flip(x))`` (``f(x)``
    without ``flip``). ``images`` may be any sliceable sequence whose slices convert to such an
    array (``np.asarray``), e.g. faces decoded batch by batch."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters(), torch.empty(0)).dtype  # float32 for a module without weights (ONNX)
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(torch.as_tensor(np.asarray(images[start:start + batch_size])).to(device)).to(dtype)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            e = model(x).float()
            if flip:
                e = e + model(torch.flip(x, dims=[3])).float()
        out.append(F.normalize(e, dim=1).cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def embed_distributed(model: torch.nn.Module, images: torch.Tensor, group=None, **kw) -> torch.Tensor:
    """:func:`embed_images` with the images split over the ranks of ``group`` (default: the
    world); every rank returns all ``N`` embeddings (in order)."""
    world, rank = pdist.get_world_size(group), pdist.get_rank(group)
    n = len(images)
    bounds = [n * r // world for r in range(world + 1)]
    local = embed_images(model, images[bounds[rank]:bounds[rank + 1]], **kw)
    # a rank without images does not know the width
    dim = all_reduce(torch.tensor([local.shape[1] if local.numel() else 0]), ReduceOp.MAX, group)
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    return gather_rows(local.reshape(sizes[rank], int(dim)), sizes, group, differentiable=False)


def _accuracy(dist2: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of ``dist2 < t`` against ``issame`` for every threshold: ``(len(THRESHOLDS),)``."""
    predict = dist2[None, :] < THRESHOLDS[:, None]
    return (predict == issame[None, :]).mean(axis=1)


def tar_at_far(dist2: np.ndarray, issame: np.ndarray, far: float = 1e-3) -> float:
    """Fraction of genuine pairs accepted (``dist2 < t``) at the largest threshold that
    accepts at most ``far`` of the impostor pairs."""
    impostor = np.sort(dist2[~issame])
    if impostor.size == 0 or not issame.any():
        return float("nan")
    allowed = int(np.floor(far * impostor.size))
    threshold = impostor[allowed] if allowed < impostor.size else np.inf
    return float((dist2[issame] < threshold).mean())


def verification_metrics(embeddings: np.ndarray | torch.Tensor, issame: np.ndarray, folds: int = 10) -> VerificationResult:
    """``embeddings (2P, D)`` (pairs consecutive, L2-normalised), ``issame (P,)`` bool."""
    e = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    dist2 = ((e[0::2] - e[1::2]) ** 2).sum(axis=1)
    accs, thresholds = [], []
    for test in np.array_split(np.arange(issame.size), folds):
        train = np.setdiff1d(np.arange(issame.size), test)
        best = int(np.argmax(_accuracy(dist2[train], issame[train])))
        thresholds.append(THRESHOLDS[best])
        accs.append(float(((dist2[test] < THRESHOLDS[best]) == issame[test]).mean()))
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(thresholds)),
                              tar_at_far(dist2, issame), int(issame.size))


class VerificationSet:
    """A decoded ``.bin`` set: ``images`` uint8 ``(2P, 3, 112, 112)``, ``issame`` ``(P,)``."""

    def __init__(self, path: str, images: np.ndarray | None = None, issame: np.ndarray | None = None):
        """The ``.bin`` at ``path``; or, given ``images`` and ``issame``, those (``path`` names them)."""
        self.path = path
        if images is None:
            images, issame = load_bin_images(path)
        self.images, self.issame = torch.from_numpy(images), issame

    def evaluate(self, model: torch.nn.Module, group=None, **kw) -> VerificationResult:
        """Embed over the ranks of ``group`` (default: the world) and score; each of them
        returns the same result."""
        return verification_metrics(embed_distributed(model, self.images, group, **kw).numpy(), self.issame)
