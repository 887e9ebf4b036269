"""``partialfc bench align``: face detectors on a folder-per-identity tree of real photos.

Per detector: photos with a face (``choose_face`` with ``select=largest``, ``min_face`` 0, so
it measures detection) and seconds per photo on one core (``torch.set_num_threads(1)``; the
detection alone, not the decoding). Per pair of detectors, on photos where both found a face:
the landmark disagreement of a photo, the mean over the five points of ``|p_a - p_b|`` over
the inter-ocular distance (IOD, the mean of both detectors'). A photo over
:data:`DIFFERENT_FACE` IODs is counted as "different faces" (the two chose different people)
and left out of the statistics (median, mean, 90th percentile, fraction under 0.1, per point).

Writes ``align.json``, ``align.md`` and ``align.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from itertools import combinations, zip_longest
from pathlib import Path

POINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
DIFFERENT_FACE = 0.5  # IODs: above, the two detectors chose different faces
CLOSE = 0.1  # IODs: the "fraction under" threshold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", required=True, help="folder-per-identity tree of photos")
    parser.add_argument("--detectors", default="mtcnn,dlib", help="comma-separated detector names")
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos, evenly across identities "
                                                             "(0: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/align"), help="output directory")
    parser.add_argument("--name", default="align", help="base name of the output files")


def sample_photos(folder: str, limit: int) -> list[str]:
    """The photos of ``folder``, or ``limit`` of them taken round-robin over the identities."""
    from partialfc.align.pipeline import list_sources

    by_identity: dict[str, list[str]] = {}
    for source in list_sources(folder)[0]:
        by_identity.setdefault(source.out.split("/")[0], []).append(source.path)
    order = [p for row in zip_longest(*by_identity.values()) for p in row if p is not None]
    return order[:limit] if limit > 0 else order


def detect_all(name: str, paths: list[str]) -> tuple[list, list[float]]:
    """``(chosen Face or None per photo, detection seconds per photo)`` of detector ``name``;
    one untimed call first; photos that cannot be read are ``None`` and not timed."""
    from partialfc.align.faces import build_detector
    from partialfc.align.photos import PhotoSkipped, load_photo
    from partialfc.align.pipeline import AlignOptions, detect_face

    detector, options = build_detector(name), AlignOptions(detector=name, select="largest", min_face=0)
    faces, seconds, warm = [], [], False
    for path in paths:
        try:
            image = load_photo(path)[0]
        except PhotoSkipped:
            faces.append(None)
            continue
        if not warm:
            detector.detect(image)
            warm = True
        start = time.perf_counter()
        try:
            face = detect_face(detector, image, options)
        except PhotoSkipped:
            face = None
        seconds.append(time.perf_counter() - start)
        faces.append(face)
    return faces, seconds


def disagreement(a, b) -> tuple:
    """``(per-point distances (5,), signed offsets b - a (5, 2))`` in inter-ocular distances."""
    import numpy as np

    iod = (np.linalg.norm(a.points[1] - a.points[0]) + np.linalg.norm(b.points[1] - b.points[0])) / 2
    offsets = (b.points - a.points) / max(iod, 1e-6)
    return np.linalg.norm(offsets, axis=1), offsets


def detector_record(name: str, faces: list, seconds: list[float]) -> dict:
    import numpy as np

    read = len(seconds)
    found = sum(f is not None for f in faces)
    return {"kind": "detector", "what": name, "photos": read, "unreadable": len(faces) - read, "found": found,
            "found_fraction": found / read if read else 0.0,
            "seconds_median": float(np.median(seconds)) if read else 0.0,
            "seconds_mean": float(np.mean(seconds)) if read else 0.0}


def pair_record(a: str, b: str, faces_a: list, faces_b: list) -> tuple[dict, list[float]]:
    """The record of the pair and the per-photo disagreements of its same-face photos."""
    import numpy as np

    both = [disagreement(fa, fb) for fa, fb in zip(faces_a, faces_b) if fa is not None and fb is not None]
    per_point = np.array([d for d, _ in both]).reshape(-1, 5)
    offsets = np.array([o for _, o in both]).reshape(-1, 5, 2)
    same = per_point.mean(1) <= DIFFERENT_FACE
    per_point, offsets, photo = per_point[same], offsets[same], per_point[same].mean(1)
    record = {"kind": "pair", "what": f"{a} vs {b}", "photos": len(both), "different_faces": int((~same).sum()),
              "compared": int(same.sum())}
    if len(photo):
        record.update(median=float(np.median(photo)), mean=float(photo.mean()),
                      p90=float(np.percentile(photo, 90)), under_0_1=float((photo < CLOSE).mean()))
        for i, point in enumerate(POINTS):
            record[f"{point}_median"] = float(np.median(per_point[:, i]))
            record[f"{point}_mean"] = float(per_point[:, i].mean())
            record[f"{point}_bias"] = [float(v) for v in offsets[:, i].mean(0)]  # mean (b - a), x and y
        record["per_point"] = " / ".join(f"{record[f'{p}_median']:.3f}" for p in POINTS)
    return record, photo.tolist()


def figure(records: list[dict], curves: dict[str, list[float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    detectors = [r for r in records if r["kind"] == "detector"]
    fig, (rate, speed, cdf) = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1, 2]})
    names = [r["what"] for r in detectors]
    rate.bar(names, [r["found_fraction"] for r in detectors], color="tab:blue")
    for i, r in enumerate(detectors):
        rate.text(i, r["found_fraction"], f"{r['found']}/{r['photos']}", ha="center", va="bottom", fontsize=8)
    rate.set_ylim(0, 1.08)
    rate.set_ylabel("fraction of photos with a face")
    speed.bar(names, [1000 * r["seconds_median"] for r in detectors], color="tab:orange", label="median")
    speed.plot(names, [1000 * r["seconds_mean"] for r in detectors], "k_", markersize=25, label="mean")
    speed.set_ylabel("ms per photo, one core")
    speed.legend(fontsize=8)
    for pair, values in curves.items():
        if values:
            x = np.sort(values)
            cdf.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{pair} ({len(x)} photos)")
    cdf.axvline(CLOSE, color="grey", linestyle="--", linewidth=1)
    cdf.set_xlim(0, DIFFERENT_FACE)
    cdf.set_xlabel("mean landmark distance / inter-ocular distance")
    cdf.set_ylabel("fraction of photos (CDF)")
    cdf.legend(fontsize=8)
    for ax in (rate, speed, cdf):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


COLUMNS = [("what", "detector / pair"), ("photos", "photos"), ("found", "face found"),
           ("found_fraction", "fraction found"), ("seconds_median", "s/photo median"), ("seconds_mean", "s/photo mean"),
           ("different_faces", "different faces"), ("median", "median"), ("mean", "mean"), ("p90", "p90"),
           ("under_0_1", "fraction < 0.1"), ("per_point", "median per point: eyes l / r, nose, mouth l / r")]


def run(args) -> int:
    import torch

    from partialfc.bench.report import markdown_table, stamp_records, write_outputs

    names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    paths = sample_photos(args.photos, args.limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for name in names:
            results[name] = detect_all(name, paths)
            print(f"{name}: {sum(f is not None for f in results[name][0])}/{len(paths)} photos with a face",
                  flush=True)
    finally:
        torch.set_num_threads(threads)
    records = [detector_record(name, *results[name]) for name in names]
    curves = {}
    for a, b in combinations(names, 2):
        record, curves[record["what"]] = pair_record(a, b, results[a][0], results[b][0])
        records.append(record)
    hardware = stamp_records(records, "align", "cpu")
    title = (f"Face detection on {len(paths)} photos of {Path(args.photos).name}, one core of {hardware}; "
             f"pair rows: photos where both found a face, landmark distance in inter-ocular distances over those "
             f"not more than {DIFFERENT_FACE} apart (the others: different faces)")
    table = f"{title}\n\n" + markdown_table(records, COLUMNS)
    fig = figure(records, curves, f"{len(paths)} photos of {Path(args.photos).name}, one core of {hardware}")
    paths_out = write_outputs(args.out, args.name, records, table, fig)
    print(table + "\n".join(map(str, paths_out)))
    return 0
