"""``partialfc data align``: every photo of a folder-per-identity tree (or a list file of
``path label`` lines) to an aligned 112x112 JPEG in the same layout under OUT.

Resumable: each result is appended to ``OUT/align.tsv`` (``photo <TAB> aligned <TAB> crop
<TAB> ten landmark coordinates and the score``, or ``photo <TAB> skipped <TAB> <TAB> reason``;
the photo relative to the source, the crop to OUT) after its crop is in place (written
atomically), and a re-run skips every photo listed there.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from partialfc.align.faces import Face, build_detector
from partialfc.align.landmarks import LandmarksFile
from partialfc.align.photos import IMAGE_SUFFIXES, MAX_SIDE, PhotoSkipped, load_photo
from partialfc.align.template import warp_face
from partialfc.data.images import encode_jpeg
from partialfc.data.parallel import ordered_map
from partialfc.errors import InputError, InputNotFoundError

JOURNAL = "align.tsv"
CONTACT_SHEET = "contact_sheet.png"
SELECT = ("largest", "central")
DETECT_SIDE = 1024  # photos are searched for faces at most this large (points are mapped back)


@dataclass(frozen=True)
class AlignOptions:
    """How faces are found and kept: ``detector`` by name with ``detector_options``, or the
    points of a ``landmarks`` file; of several faces the ``select`` one (largest box, or the
    one nearest the photo's centre) among those whose box is at least ``min_face`` px."""

    detector: str = "mtcnn"
    detector_options: tuple[tuple[str, object], ...] = ()
    landmarks: str | None = None
    select: str = "largest"
    min_face: int = 32
    quality: int = 95

    def __post_init__(self):
        if self.select not in SELECT:
            raise InputError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.min_face < 0 or not 1 <= self.quality <= 100:
            raise InputError("min_face must be >= 0 and quality 1..100")


@dataclass(frozen=True)
class Source:
    """One photo: its ``path``, its ``key`` in the journal (path relative to the source) and
    the ``out`` path of its crop, relative to OUT (``identity/name.jpg``)."""

    path: str
    key: str
    out: str


def list_sources(src: str, previous: dict[str, str] | None = None) -> tuple[list[Source], list[str], list[Source]]:
    """``(photos, empty identity folders, non-image files)`` of a folder-per-identity tree, or
    of a list file of ``path label`` lines (paths relative to the list's folder or absolute;
    the label names the output folder; a path listed twice is an error). Hidden files are
    ignored. ``previous``: ``{photo key: crop}`` of an earlier run, whose crop names are kept
    (a photo added beside ``a.jpg`` never takes the name of another photo's crop)."""
    if os.path.isdir(src):
        entries, empty = [], []
        for folder in sorted((e for e in os.scandir(src) if e.is_dir() and not e.name.startswith(".")),
                             key=lambda e: e.name):
            files = sorted(f.name for f in os.scandir(folder.path) if f.is_file() and not f.name.startswith("."))
            if not any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
                empty.append(folder.name)
            entries += [(os.path.join(folder.path, f), f"{folder.name}/{f}", folder.name) for f in files]
    elif os.path.isfile(src):
        empty, entries, root, listed = [], [], os.path.dirname(os.path.abspath(src)), set()
        with open(src, encoding="utf-8", errors="surrogateescape") as f:  # non-UTF-8 names as os.scandir
            for number, line in enumerate(f, 1):
                fields = line.strip().rsplit(None, 1)
                if not fields:
                    continue
                if len(fields) != 2:
                    raise InputError(f"{src}:{number}: expected 'path label'")
                path, label = fields
                if "/" in label or label in (".", ".."):
                    raise InputError(f"{src}:{number}: the label {label!r} must be a plain name")
                if path in listed:
                    raise InputError(f"{src}:{number}: {path} is listed twice")
                listed.add(path)
                entries.append((os.path.join(root, path), path, label))
    else:
        raise InputNotFoundError(f"{src}: no such folder or list file")
    labels = {key: label for _, key, label in entries}
    kept = {key: crop for key, crop in (previous or {}).items() if labels.get(key) == crop.split("/", 1)[0]}
    photos, others, taken = [], [], set(kept.values())
    for path, key, label in entries:
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            others.append(Source(path, key, ""))
            continue
        out = kept.get(key)
        if out is None:  # name.png beside name.jpg, or one name from two folders of a list
            stem, n = Path(path).stem, 1
            out = f"{label}/{stem}.jpg"
            while out in taken:
                n += 1
                out = f"{label}/{stem}_{n}.jpg"
            taken.add(out)
        photos.append(Source(path, key, out))
    if not photos:
        raise InputNotFoundError(f"{src}: no photos found")
    return photos, empty, others


def choose_face(faces: list[Face], shape: tuple[int, ...], select: str, min_face: float,
                confident: float | None = None, scale: float = 1.0) -> Face:
    """The face to keep of a ``shape`` image: among those at least ``min_face`` px of the photo
    (the image is the photo at ``scale``) and, when some score at least ``confident``, among
    those, the largest or the most central one; :class:`PhotoSkipped` when there is none."""
    if not faces:
        raise PhotoSkipped("no face")
    big = [f for f in faces if f.size / scale >= min_face]
    if not big:
        raise PhotoSkipped("face too small",
                           f"largest {max(f.size for f in faces) / scale:.1f} px < {min_face:g} px")
    if confident is not None and any(f.score >= confident for f in big):
        big = [f for f in big if f.score >= confident]  # a shirt print scored 0.8 must not win by its size
    if select == "largest":
        return max(big, key=lambda f: f.size)
    centre = np.array([shape[1], shape[0]]) / 2
    return min(big, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)))


def detect_face(detector, image: np.ndarray, options: AlignOptions, photo_scale: float = 1.0) -> Face:
    """The chosen face of ``image``, searched on a copy at most :data:`DETECT_SIDE` px (larger
    when a face of ``min_face`` px would fall below the detector's ``min_size``); the box and
    points in ``image``'s pixels, ``min_face`` in the full-size photo's (``image`` is the photo
    decoded at ``photo_scale``, as :func:`load_photo` says)."""
    # at most DETECT_SIDE px, unless a face of min_face px would then be below what the detector finds
    smallest = getattr(detector, "min_size", 20) / (options.min_face * photo_scale) if options.min_face > 0 else 0.0
    scale = min(1.0, max(DETECT_SIDE / max(image.shape[:2]), smallest))
    small = image
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2.0))
    faces = [Face((f.box + 0.5) / scale - 0.5, (f.points + 0.5) / scale - 0.5, f.score) if scale < 1.0 else f
             for f in detector.detect(small)]
    return choose_face(faces, image.shape, options.select, options.min_face, getattr(detector, "confident", None),
                       photo_scale)


_DETECTORS: dict[tuple, object] = {}


def _detector(options: AlignOptions):
    """This process's detector for ``options`` (built once per process)."""
    key = (options.detector, options.detector_options)
    if key not in _DETECTORS:
        _DETECTORS[key] = build_detector(options.detector, **dict(options.detector_options))
    return _DETECTORS[key]


def align_photo(path: str, options: AlignOptions, points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(crop (112, 112, 3) uint8, points (5, 2) in the upright photo's pixels, score)`` of
    the photo at ``path``: its given ``points`` (required when ``options.landmarks`` is set),
    or its chosen detected face. Raises :class:`PhotoSkipped`."""
    if options.landmarks and points is None:
        raise PhotoSkipped("no landmarks")
    image, scale = load_photo(path, MAX_SIDE)
    if points is not None and not (np.isfinite(points).all() and points.std(0).min() > 0.5):
        raise PhotoSkipped("bad landmarks", "the five points coincide or lie on a line")  # -1 placeholders
    if points is not None:  # pixel centres: p of the full-size photo is (p + 0.5) * scale - 0.5 of image
        return warp_face(image, (points + 0.5) * scale - 0.5), points, 1.0
    face = detect_face(_detector(options), image, options, scale)
    return warp_face(image, face.points), (face.points + 0.5) / scale - 0.5, face.score


def _align_task(task: tuple[Source, str, AlignOptions, np.ndarray | None]) -> tuple[str, str]:
    """Align one photo and write its crop under ``out_dir``: ``(status, detail)`` for the journal."""
    source, out_dir, options, points = task
    try:
        crop, points, score = align_photo(source.path, options, points)
    except PhotoSkipped as skipped:
        return "skipped", str(skipped)
    target = os.path.join(out_dir, source.out)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(encode_jpeg(crop, options.quality))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):  # a failed write (full disk) leaves no partial file behind
            os.remove(tmp)
    return "aligned", " ".join(f"{v:.2f}" for v in points.reshape(-1)) + f" {score:.4f}"


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(field: str) -> str:
    """A journal field with backslash, tab, newline and carriage return escaped (names may hold them)."""
    return "".join(_ESCAPES.get(c, c) for c in field)


def _unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), field)


def read_journal(out_dir: str) -> dict[str, tuple[str, str, str]]:
    """``{photo key: (status, crop, detail)}`` of ``OUT/align.tsv``; a line cut short by a kill
    is ignored (that photo is done again)."""
    journal, path = {}, os.path.join(out_dir, JOURNAL)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for line in f:
                if line.endswith("\n") and line.count("\t") == 3:
                    key, status, crop, detail = (_unescape(field) for field in line[:-1].split("\t"))
                    journal[key] = (status, crop, detail)
    return journal


def _drop_cut_line(path: str) -> None:
    """Truncate the journal after its last newline: a line a kill cut short (ignored by
    :func:`read_journal`, its photo is done again) must not be continued by the next line."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


@dataclass
class AlignReport:
    """What one ``data align`` run did: ``aligned`` and ``skipped`` (by reason) are this run's,
    ``done_before`` the photos an earlier run finished; ``skipped_photos``: ``(photo, reason)``
    over all runs."""

    aligned: int = 0
    skipped: Counter = field(default_factory=Counter)
    done_before: int = 0
    seconds: float = 0.0
    empty_identities: list[str] = field(default_factory=list)
    skipped_photos: list[tuple[str, str]] = field(default_factory=list)
    crops: list[str] = field(default_factory=list)  # of the photos the source holds now, relative to out_dir
    out_dir: str = ""

    @property
    def processed(self) -> int:
        return self.aligned + sum(self.skipped.values())

    def rows(self) -> list[tuple[str, str]]:
        """The summary table's ``(what, count)`` rows."""
        rows = [("aligned", str(self.aligned))]
        rows += [(f"skipped: {reason}", str(n)) for reason, n in sorted(self.skipped.items())]
        if self.done_before:
            rows.append(("done by an earlier run", str(self.done_before)))
        if self.empty_identities:
            rows.append(("identity folders without photos", str(len(self.empty_identities))))
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        rows.append(("photos per second", f"{rate:.1f}"))
        return rows


def align_folder(src: str, out_dir: str, options: AlignOptions = AlignOptions(), workers: int | None = 1,
                 progress: bool = True, retry_skipped: bool = False) -> AlignReport:
    """Align every photo of ``src`` into ``out_dir`` (see the module docstring); photos the
    journal lists are not done again, except, with ``retry_skipped``, those it lists as skipped
    (say after a change of ``min_face`` or detector, or of the landmarks file)."""
    os.makedirs(out_dir, exist_ok=True)
    journal = read_journal(out_dir)
    photos, empty, others = list_sources(src, {k: crop for k, (status, crop, _) in journal.items() if crop})
    landmarks = LandmarksFile(options.landmarks, src if os.path.isdir(src) else os.path.dirname(src)) \
        if options.landmarks else None
    if landmarks is None:
        _detector(options)  # a bad detector option fails here, once
    report = AlignReport(empty_identities=empty, out_dir=out_dir)

    def aligned(source: Source) -> bool:
        return journal.get(source.key, ("",) * 3)[:2] == ("aligned", source.out) and \
            os.path.isfile(os.path.join(out_dir, source.out))

    todo = []
    for source in photos:
        if aligned(source) or journal.get(source.key, ("",))[0] == "skipped" and not retry_skipped:
            report.done_before += 1
        else:
            todo.append((source, out_dir, options, None if landmarks is None else landmarks.points(source.path)))
    start = time.perf_counter()
    journal_path = os.path.join(out_dir, JOURNAL)
    if os.path.isfile(journal_path):
        _drop_cut_line(journal_path)
    with open(journal_path, "a", encoding="utf-8", errors="surrogateescape", newline="\n") as log:  # non-UTF-8 names
        def record(key: str, status: str, crop: str, detail: str) -> None:
            log.write("\t".join(_escape(field) for field in (key, status, crop, detail)) + "\n")
            log.flush()
            journal[key] = (status, crop, detail)
            if status == "aligned":
                report.aligned += 1
            else:
                report.skipped[detail.split(":")[0]] += 1

        for source in others:
            if source.key not in journal:
                record(source.key, "skipped", "", "not an image: not an image file name")
        results = ordered_map(_align_task, todo, len(todo), workers, desc="aligning", unit="photo",
                              progress=progress, chunksize=1, start_method="spawn")
        for (source, *_), (status, detail) in zip(todo, results):
            record(source.key, status, source.out if status == "aligned" else "", detail)
    report.seconds = time.perf_counter() - start
    report.skipped_photos = [(key, detail) for key, (status, _, detail) in journal.items() if status == "skipped"]
    report.crops = [source.out for source in photos if aligned(source)]
    return report
