"""Face detection on real photos (celeba_wild, beside the repository; skipped without it):
MTCNN's detection rate, the five points' order and place, MTCNN and dlib agreeing; the
``bench align`` command on a few photos; and, with no photos, dlib's five points of a 68-point
shape, option checking, a blank image and the NMS against a brute-force reference."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from partialfc.align.dlib_detector import PREDICTOR
from partialfc.align.faces import build_detector
from partialfc.align.nms import nms
from partialfc.errors import ConfigError

CELEBA = Path(__file__).resolve().parents[2] / "shared/data/celeba_wild"
PER_IDENTITY = 2  # photos of each identity in the sample (60 identities: 120 photos)
HAVE_MTCNN = importlib.util.find_spec("facenet_pytorch") is not None
HAVE_DLIB = importlib.util.find_spec("dlib") is not None and Path(PREDICTOR).is_file()

needs_celeba = pytest.mark.skipif(not CELEBA.is_dir(), reason=f"no celeba_wild photos at {CELEBA}")
needs_mtcnn = pytest.mark.skipif(not HAVE_MTCNN, reason="facenet-pytorch (MTCNN weights) not installed")
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib or its 68-point predictor not installed")


def sample() -> list[Path]:
    """The first ``PER_IDENTITY`` photos (by name) of every identity folder."""
    return [photo for folder in sorted(p for p in CELEBA.iterdir() if p.is_dir())
            for photo in sorted(folder.glob("*.jpg"))[:PER_IDENTITY]]


@pytest.fixture(scope="module")
def detections() -> dict[str, list]:
    """``{detector: [chosen Face or None per sample photo]}`` (largest face, no minimum size)."""
    from partialfc.align.photos import PhotoSkipped, load_photo
    from partialfc.align.pipeline import AlignOptions, detect_face

    images = [load_photo(p)[0] for p in sample()]
    found = {}
    for name in ("mtcnn", "dlib"):
        detector, options = build_detector(name), AlignOptions(detector=name, min_face=0)
        found[name] = []
        for image in images:
            try:
                found[name].append(detect_face(detector, image, options))
            except PhotoSkipped:
                found[name].append(None)
    return found


def iod_distance(a, b) -> float:
    """Mean distance of the five points over the mean inter-ocular distance of both faces."""
    iod = (np.linalg.norm(a.points[1] - a.points[0]) + np.linalg.norm(b.points[1] - b.points[0])) / 2
    return float(np.linalg.norm(a.points - b.points, axis=1).mean() / iod)


def upright(points: np.ndarray) -> np.ndarray:
    """The five points with the left eye at the origin and the eye line along +x (y down): a
    tilted head's points as if it were upright."""
    c, s = (points[1] - points[0]) / np.linalg.norm(points[1] - points[0])
    return (points - points[0]) @ np.array([[c, -s], [s, c]])


# --- real photos ---------------------------------------------------------------------------

@needs_celeba
@needs_mtcnn
@needs_dlib
def test_mtcnn_finds_a_face_in_nearly_every_photo(detections):
    faces = detections["mtcnn"]
    assert len(faces) == 60 * PER_IDENTITY
    assert sum(f is not None for f in faces) >= 0.95 * len(faces)


@needs_celeba
@needs_mtcnn
@needs_dlib
@pytest.mark.parametrize("name", ["mtcnn", "dlib"])
def test_five_points_are_in_face_order_and_inside_the_box(detections, name):
    photos, bad = sample(), []
    for photo, face in zip(photos, detections[name]):
        if face is None:
            continue
        x1, y1, x2, y2 = face.box
        margin = 0.1 * max(x2 - x1, y2 - y1)
        inside = np.all((face.points >= [x1 - margin, y1 - margin]) & (face.points <= [x2 + margin, y2 + margin]))
        (lx, _), (rx, _) = face.points[:2]
        _, (_, ny), (mlx, mly), (mrx, mry) = upright(face.points)[1:]
        ordered = lx < rx and 0 < ny < min(mly, mry) and mlx < mrx
        if not (inside and ordered):
            bad.append(f"{photo.parent.name}/{photo.name}: box {face.box.round(1)} points {face.points.round(1)}")
    assert not bad, "\n".join(bad)


@needs_celeba
@needs_mtcnn
@needs_dlib
def test_mtcnn_and_dlib_agree_within_a_tenth_of_the_eye_distance(detections):
    both = [iod_distance(a, b) for a, b in zip(detections["mtcnn"], detections["dlib"])
            if a is not None and b is not None]
    assert len(both) >= 0.8 * len(sample())
    assert np.median(both) < 0.1


@needs_celeba
@needs_mtcnn
@needs_dlib
def test_bench_align_writes_consistent_outputs(tmp_path, detections):
    import torch

    from partialfc.cli import main

    photos = sample()[:3 * PER_IDENTITY]  # the first three identities
    for photo in photos:
        (tmp_path / "photos" / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, tmp_path / "photos" / photo.parent.name / photo.name)
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    assert main(["bench", "align", "--photos", str(tmp_path / "photos"), "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the one-core setting is undone

    records = json.loads((out / "align.json").read_text())
    by_name = {r["what"]: r for r in records}
    assert set(by_name) == {"mtcnn", "dlib", "mtcnn vs dlib"}
    for name in ("mtcnn", "dlib"):
        r = by_name[name]
        assert r["photos"] == len(photos) and 0 <= r["found"] <= r["photos"]
        assert 0.0 <= r["found_fraction"] <= 1.0 and r["found_fraction"] == pytest.approx(r["found"] / r["photos"])
        assert 0.0 < r["seconds_median"] and 0.0 < r["seconds_mean"]
    pair = by_name["mtcnn vs dlib"]
    expected = sum(a is not None and b is not None for a, b in
                   zip(detections["mtcnn"][:len(photos)], detections["dlib"][:len(photos)]))
    assert pair["photos"] == expected <= min(by_name["mtcnn"]["found"], by_name["dlib"]["found"])
    assert pair["compared"] + pair["different_faces"] == pair["photos"]
    if pair["compared"]:
        assert 0.0 <= pair["under_0_1"] <= 1.0 and 0.0 <= pair["median"] <= pair["p90"] <= 0.5
    table = (out / "align.md").read_text()
    assert all(f"| {name} |" in table for name in by_name)
    assert (out / "align.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- no photos -----------------------------------------------------------------------------

def test_dlib_five_points_of_a_68_point_shape():
    from partialfc.align.dlib_detector import five_points

    shape = np.random.default_rng(0).uniform(0, 100, (68, 2))
    expected = [shape[36:42].mean(0), shape[42:48].mean(0), shape[30], shape[48], shape[54]]
    np.testing.assert_allclose(five_points(shape), np.array(expected))


def test_an_option_the_detector_does_not_take_is_a_config_error():
    with pytest.raises(ConfigError, match="model"):
        build_detector("mtcnn", model="x")


@needs_mtcnn
@pytest.mark.parametrize("size", [(200, 160), (8, 8)])
def test_mtcnn_finds_no_face_in_a_blank_grey_image(size):
    assert build_detector("mtcnn").detect(np.full((*size, 3), 128, np.uint8)) == []


def reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, by: str) -> list[int]:
    """Greedy NMS the slow way: a box is kept unless it overlaps a kept better one too much."""
    def area(b):
        return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)

    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):  # stable: ties by index
        overlaps = []
        for k in kept:
            a, b = boxes[k], boxes[i]
            inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
            denom = min(area(a), area(b)) if by == "min" else area(a) + area(b) - inter
            overlaps.append(inter / denom if denom > 0 else 0.0)
        if all(o <= threshold for o in overlaps):
            kept.append(i)
    return kept


@pytest.mark.parametrize("by", ["union", "min"])
@pytest.mark.parametrize("grid", [False, True])
def test_nms_matches_a_brute_force_reference(by, grid):
    rng = np.random.default_rng(1 + grid)
    for trial in range(30):
        n = int(rng.integers(0, 40))
        xy = rng.uniform(0, 50, (n, 2))
        wh = rng.uniform(0, 30, (n, 2))
        wh[rng.random(n) < 0.1] = 0.0  # some empty boxes
        boxes = np.concatenate([xy, xy + wh], 1)
        scores = rng.random(n)
        if grid:  # integer corners and tied scores: overlaps exactly at the threshold, ties in order
            boxes, scores = np.round(boxes / 5) * 5, np.round(scores, 1)
        for threshold in (0.0, 0.3, 0.5, 0.7):
            kept = nms(boxes, scores, threshold, by=by)
            assert kept.dtype == np.int64
            assert kept.tolist() == reference_nms(boxes, scores, threshold, by), (trial, threshold)


def test_a_missing_detector_package_is_one_error_line_naming_the_install(monkeypatch, capsys, tmp_path):
    """Without facenet-pytorch (MTCNN's weights) or dlib, data align stops before any work with
    one line saying what to install."""
    import importlib

    from partialfc.align import mtcnn
    from partialfc.cli import main
    (tmp_path / "src/ana").mkdir(parents=True)
    (tmp_path / "src/ana/a.jpg").write_bytes(b"x")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mtcnn.importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_pytorch" else real_find_spec(name, *a))
    assert main(["data", "align", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps 'facenet-pytorch" in err[0]
    real_import = importlib.import_module

    def without_dlib(name, *args):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_dlib)
    assert main(["data", "align", str(tmp_path / "src"), str(tmp_path / "out"), "--detector", "dlib",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'partialfc[align]'" in err[0]
    assert not (tmp_path / "out/ana").exists()
