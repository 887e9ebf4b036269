"""IJB-B / IJB-C 1:1 verification (template against template), on the public release layout::

    DIR/meta/<t>_face_tid_mid.txt         image_name template_id media_id
    DIR/meta/<t>_template_pair_label.txt  template_a template_b label(1 same, 0 not)
    DIR/meta/<t>_name_5pts_score.txt      image_name x1 y1 ... x5 y5 detector_score
    DIR/loose_crop/<image_name>

(``<t>`` is ``ijbb`` or ``ijbc``). Protocol: each face is aligned to 112x112 by the similarity
transform taking its 5 landmarks to the ArcFace template; its feature is the L2-normalised
``f(x) + f(flip(x))`` (``f(x)`` without the flip test), optionally times the detector score.
A media's feature is the mean of its faces', a template's the sum of its medias', then
L2-normalised; a pair's score is the dot product of its two templates. TAR at FAR ``x``: the
fraction of genuine pairs scoring above the lowest threshold that accepts at most ``x`` of the
impostor pairs. The faces are embedded batch by batch, split over the ranks of a process group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from partialfc.errors import InputNotFoundError
from partialfc.eval.verification import LazyFaces, embed_distributed, tar_at_far

# 5 landmarks (eyes, nose, mouth corners) of a 112x112 ArcFace crop, in pixels
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` similarity (scale, rotation, translation) mapping points ``src (K, 2)``
    closest to ``dst (K, 2)`` in least squares (Umeyama, no reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """uint8 ``(3, size, size)``: ``image`` warped so that ``landmarks (5, 2)`` land on the
    ArcFace template (bilinear; pixel centres at integer coordinates)."""
    forward = np.vstack([similarity_transform(landmarks, ARCFACE_TEMPLATE * size / 112), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]  # PIL asks, for each output pixel, where to sample the input
    inverse[:, 2] += 0.5 - inverse[:, :2] @ [0.5, 0.5]  # PIL puts pixel centres at +0.5
    out = image.convert("RGB").transform((size, size), Image.Transform.AFFINE, tuple(inverse.ravel()),
                                         resample=Image.Resampling.BILINEAR)
    return np.asarray(out).transpose(2, 0, 1)


@dataclass(frozen=True)
class IJBSet:
    """One IJB target: per face ``names``, ``templates``, ``medias``, ``landmarks (N, 5, 2)``,
    ``scores`` (detector); per pair ``pairs (P, 2)`` template ids and ``labels (P,)`` bool."""
    root: str
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray


def read_ijb(dataset_dir: str, target: str) -> IJBSet:
    """The meta files of ``target`` (``IJBB``/``IJBC``) under ``dataset_dir``."""
    t = target.lower()
    paths = [os.path.join(dataset_dir, "meta", f"{t}_{kind}.txt")
             for kind in ("face_tid_mid", "template_pair_label", "name_5pts_score")]
    for path in paths:
        if not os.path.isfile(path):
            raise InputNotFoundError(f"{target}: {path} not found (expected the IJB release layout)")
    tid_mid = {}
    with open(paths[0]) as f:
        for line in f:
            name, tid, mid = line.split()[:3]
            tid_mid[name] = (int(tid), int(mid))
    pairs = np.loadtxt(paths[1], dtype=np.int64, ndmin=2)
    names, points = [], []
    with open(paths[2]) as f:
        for line in f:
            name, *values = line.split()
            names.append(name)
            points.append([float(v) for v in values[:11]])
    missing = [n for n in names if n not in tid_mid]
    if missing:
        raise InputNotFoundError(f"{target}: {len(missing)} faces have no template, e.g. {missing[0]}")
    points = np.asarray(points).reshape(-1, 11)
    ids = np.array([tid_mid[n] for n in names]).reshape(-1, 2)
    return IJBSet(os.path.join(dataset_dir, "loose_crop"), names, ids[:, 0], ids[:, 1],
                  points[:, :10].reshape(-1, 5, 2), points[:, 10], pairs[:, :2], pairs[:, 2].astype(bool))


class AlignedFaces(LazyFaces):
    """The faces of an :class:`IJBSet` (``items``: face indices), read and aligned only when a
    slice is turned into an array."""

    def __init__(self, ijb: IJBSet):
        super().__init__(range(len(ijb.names)))
        self.ijb = ijb

    def face(self, i: int) -> np.ndarray:
        path = os.path.join(self.ijb.root, self.ijb.names[i])
        if not os.path.isfile(path):
            raise InputNotFoundError(f"IJB face {path} not found")
        with Image.open(path) as image:
            return align_face(image, self.ijb.landmarks[i])


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids (T,), L2-normalised template features (T, D))`` from face features
    ``(N, D)``: mean over each media's faces, sum over the template's medias."""
    ids, template_of = np.unique(templates, return_inverse=True)
    keys, media_of = np.unique(np.stack([template_of, medias], 1), axis=0, return_inverse=True)
    media_of = media_of.ravel()
    media_sum = np.zeros((len(keys), features.shape[1]))
    np.add.at(media_sum, media_of, features)
    media_mean = media_sum / np.bincount(media_of, minlength=len(keys))[:, None]
    out = np.zeros((len(ids), features.shape[1]))
    np.add.at(out, keys[:, 0], media_mean)
    return ids, out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def pair_scores(ids: np.ndarray, features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine score ``(P,)`` of each template pair (``features`` normalised, rows ``ids``)."""
    row = {int(t): i for i, t in enumerate(ids)}
    a = features[[row[int(t)] for t in pairs[:, 0]]]
    b = features[[row[int(t)] for t in pairs[:, 1]]]
    return (a * b).sum(1)


@dataclass(frozen=True)
class IJBResult:
    target: str
    tar_at_far: dict[str, float]  # "1e-04" -> TAR
    num_pairs: int
    num_faces: int
    scores: np.ndarray
    labels: np.ndarray

    def as_dict(self) -> dict:
        return {"target": self.target, "tar_at_far": self.tar_at_far, "num_pairs": self.num_pairs,
                "num_faces": self.num_faces}


def evaluate_ijb(model: torch.nn.Module, dataset_dir: str, target: str = "IJBC", flip: bool = True,
                 detector_score: bool = False, batch_size: int = 128,
                 device: str | torch.device = "cpu") -> IJBResult:
    """The 1:1 protocol above on ``target``; every rank of a process group returns the result."""
    ijb = read_ijb(dataset_dir, target)
    features = embed_distributed(model, AlignedFaces(ijb), batch_size=batch_size, device=device,
                                 flip=flip).numpy().astype(np.float64)
    if detector_score:
        features = features * ijb.scores[:, None]
    ids, templates = template_features(features, ijb.templates, ijb.medias)
    scores = pair_scores(ids, templates, ijb.pairs)
    tars = {f"{far:.0e}": tar_at_far(-scores, ijb.labels, far) for far in FARS}
    return IJBResult(target, tars, len(scores), len(ijb.names), scores, ijb.labels)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(FAR, TAR)`` at every threshold, from the highest score down."""
    order = np.argsort(-scores, kind="stable")
    genuine = labels[order]
    return np.cumsum(~genuine) / max((~genuine).sum(), 1), np.cumsum(genuine) / max(genuine.sum(), 1)


def write_report(result: IJBResult, out_dir: str) -> tuple[str, str]:
    """``<target>.json`` (TARs) and ``<target>_roc.png`` (TAR against log FAR) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{result.target.lower()}.json")
    with open(json_path, "w") as f:
        json.dump(result.as_dict(), f, indent=2)
    far, tar = roc_curve(result.scores, result.labels)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(far[far > 0], tar[far > 0])
    ax.set(xscale="log", xlim=(1e-6, 1), ylim=(0, 1), xlabel="FAR", ylabel="TAR",
           title=f"{result.target} 1:1 verification ({result.num_pairs} pairs)")
    ax.grid(True, which="both", alpha=0.3)
    png_path = os.path.join(out_dir, f"{result.target.lower()}_roc.png")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return json_path, png_path
