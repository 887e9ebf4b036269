"""Synthetic face-like identities: learnable by a CNN, but not by colour or a pixel template.

An identity is geometry: 5-7 ellipses, rectangles and triangles at random places with random
sizes, each dark or light and nearly grey (little hue), on a transparent canvas larger than the
crop. Each image of an identity views those parts through a random small affine transform
(rotation +-8 deg, scale 0.88-1.12, shift +-4 px) and pastes them on a background of its own (a
random smooth mid-tone colour field), adds a random grey occluder, then a global photometric
jitter shared by all identities (contrast 0.6-1.4, per-channel gain 0.75-1.25 and offset,
brightness +-40), Gaussian noise and JPEG. So mean colour says nothing about identity and views of one identity are far
apart in pixels: a randomly initialised backbone verifies held-out pairs near chance (~0.7),
a trained one well (see docs/data.md). Verification identities are drawn from a separate seed
stream, from the same distribution, so they never occur in training.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from partialfc.data.images import encode_jpeg
from partialfc.data.parallel import ordered_map
from partialfc.data.recordio import RecordWriter, pack_payload, pack_range
from partialfc.data.verification_bin import write_bin
from partialfc.errors import InputError

CANVAS = 144
TRAIN_STREAM, VERIFY_STREAM, PAIRS_STREAM = 0, 1, 2


def identity_template(rng: np.random.Generator) -> Image.Image:
    """The pattern of one identity: RGBA ``CANVAS x CANVAS``, transparent outside its parts."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(5, 8)):
        # dark or light, so a part stands out from the mid-grey background whatever the jitter
        grey = int(rng.integers(0, 70)) if rng.random() < 0.5 else int(rng.integers(185, 256))
        colour = tuple(int(np.clip(grey + c, 0, 255)) for c in rng.normal(0, 30, 3)) + (255,)
        cx, cy = rng.integers(30, CANVAS - 30, 2)
        w, h = rng.integers(10, 26, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=colour)
        else:
            draw.polygon([(cx - w, cy + h), (cx + w, cy + h), (cx, cy - h)], fill=colour)
    return canvas


def render_view(template: Image.Image, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One augmented uint8 RGB ``(size, size, 3)`` view of an identity template."""
    angle = math.radians(rng.uniform(-8, 8))
    scale = rng.uniform(0.88, 1.12)
    shift = rng.uniform(-4, 4, 2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    centre_in, centre_out = CANVAS / 2 + shift, size / 2
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    c = centre_in[0] - cos * centre_out + sin * centre_out
    f = centre_in[1] - sin * centre_out - cos * centre_out
    parts = template.transform((size, size), Image.AFFINE, (cos, -sin, c, sin, cos, f), resample=Image.BILINEAR)
    # a background that belongs to the image, not to the identity: a random smooth colour field
    field = rng.uniform(60, 195) + rng.uniform(-64, 64, (3, 3, 3))
    view = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    view.paste(parts, (0, 0), parts)
    occluder = ImageDraw.Draw(view)
    x, y = rng.integers(0, size, 2)
    w, h = rng.integers(6, 22, 2)
    occluder.rectangle([x, y, x + w, y + h], fill=(int(rng.integers(0, 256)),) * 3)
    pixels = np.asarray(view, dtype=np.float32)
    # global photometric jitter shared by all identities: contrast, per-channel gain and offset
    gain = rng.uniform(0.6, 1.4) * rng.uniform(0.75, 1.25, 3)
    pixels = (pixels - 128.0) * gain.astype(np.float32) + 128.0 + rng.normal(0, 25, 3) + rng.uniform(-40, 40)
    pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _effective_workers(workers: int | None) -> int | None:
    """``workers``, or 1 (in-process) where a pool cannot be used: a daemonic process (a
    ``multiprocessing`` worker, e.g. of a test runner or a loader) may not have children."""
    if mp.current_process().daemon or (workers is not None and workers <= 1):
        return 1
    return workers


def render_identity(task: tuple[int, int, int, int, int]) -> list[bytes]:
    """JPEG bytes of ``num_images`` views of identity ``identity`` from seed stream ``stream``.
    ``task = (seed, stream, identity, num_images, quality)``; deterministic."""
    seed, stream, identity, num_images, quality = task
    rng = np.random.default_rng([seed, stream, identity])
    template = identity_template(rng)
    return [encode_jpeg(render_view(template, rng), quality) for _ in range(num_images)]


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths and counts of a dataset written by :func:`write_synthetic_dataset`."""

    rec_path: str
    idx_path: str
    bin_path: str | None
    num_images: int
    num_classes: int
    num_pairs: int


def write_synthetic_dataset(prefix: str | os.PathLike, num_identities: int, images_per_identity: int,
                            verification_identities: int = 100, verification_pairs: int = 1000,
                            seed: int = 0, quality: int = 90, shuffle: bool = False,
                            workers: int | None = None, progress: bool = True) -> SyntheticDataset:
    """Write ``prefix.rec/.idx`` (header flavour: ``num_identities x images_per_identity``
    images, identities contiguous, labels ``0..num_identities-1``) and, when
    ``verification_pairs > 0``, ``prefix.bin`` with ``verification_pairs`` pairs (alternately
    same / different identity) of held-out identities. Streams: memory stays small at any size.
    ``shuffle=True`` writes the images in random order instead (plain flavour, keys ``0..N-1``;
    what DALI needs, whose own shuffle is only a local buffer).
    """
    prefix = str(prefix)
    if verification_pairs > 0:
        _check_verification_identities(verification_identities)  # before any file is written
    if shuffle:
        from partialfc.data.tools import shuffle_dataset
        sorted_prefix = prefix + ".sorted"
        result = write_synthetic_dataset(sorted_prefix, num_identities, images_per_identity, verification_identities,
                                         verification_pairs, seed, quality, False, workers, progress)
        shuffle_dataset(sorted_prefix, prefix, seed, progress)
        for suffix in (".rec", ".idx"):
            os.remove(sorted_prefix + suffix)
        if result.bin_path is not None:
            os.replace(result.bin_path, prefix + ".bin")
        return SyntheticDataset(prefix + ".rec", prefix + ".idx", result.bin_path and prefix + ".bin",
                                result.num_images, result.num_classes, result.num_pairs)
    workers = _effective_workers(workers)
    n = num_identities * images_per_identity
    tasks = ((seed, TRAIN_STREAM, i, images_per_identity, quality) for i in range(num_identities))
    with RecordWriter(prefix + ".rec", prefix + ".idx") as writer:
        writer.write(0, pack_range(n + 1, n + 1 + num_identities))
        key = 1
        for identity, jpegs in enumerate(ordered_map(render_identity, tasks, num_identities, workers,
                                                     desc="synthetic identities", unit="id",
                                                     progress=progress)):
            for jpeg in jpegs:
                writer.write(key, pack_payload(identity, jpeg, key=key))
                key += 1
        for identity in range(num_identities):
            first = 1 + identity * images_per_identity
            writer.write(n + 1 + identity, pack_range(first, first + images_per_identity))
    bin_path = None
    if verification_pairs > 0:
        bin_path = prefix + ".bin"
        write_verification_pairs(bin_path, verification_identities, verification_pairs, seed, quality, workers)
    return SyntheticDataset(prefix + ".rec", prefix + ".idx", bin_path, n, num_identities, verification_pairs)


def _check_verification_identities(num_identities: int) -> None:
    if num_identities < 2:
        raise InputError(f"verification pairs need at least 2 held-out identities, got {num_identities}")


def write_verification_pairs(path: str, num_identities: int, num_pairs: int, seed: int = 0,
                             quality: int = 90, workers: int | None = None, images_per_identity: int = 6) -> None:
    """A ``.bin`` of ``num_pairs`` pairs over ``num_identities`` held-out identities; even pairs
    are the same identity (two different views), odd pairs two different identities."""
    _check_verification_identities(num_identities)
    workers = _effective_workers(workers)
    tasks = ((seed, VERIFY_STREAM, i, images_per_identity, quality) for i in range(num_identities))
    views = list(ordered_map(render_identity, tasks, num_identities, workers, progress=False))
    rng = np.random.default_rng([seed, PAIRS_STREAM])
    images, issame = [], []
    for p in range(num_pairs):
        same = p % 2 == 0
        if same:
            a = b = int(rng.integers(num_identities))
            i, j = rng.choice(images_per_identity, 2, replace=False)
        else:
            a, b = (int(x) for x in rng.choice(num_identities, 2, replace=False))
            i, j = rng.integers(images_per_identity, size=2)
        images += [views[a][i], views[b][j]]
        issame.append(same)
    write_bin(path, images, issame)
