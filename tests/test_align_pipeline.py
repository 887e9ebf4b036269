"""``partialfc data align`` on what real photo folders hold: every photo kind (CMYK, grayscale,
16-bit, alpha, EXIF-rotated, huge, damaged), files that are not photos, empty identities, list
files, name collisions, several or no faces, the journal and resume, workers, the contact sheet
and the command line. Crops are checked against references computed here (a least-squares
similarity by ``np.linalg.lstsq`` and ``cv2.warpAffine``, see test_align_warp) from the pixels
each photo is meant to hold. Most runs read a landmarks file written here; the face-selection
cases use a stub detector registered for the test."""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from partialfc.align import faces as faces_module
from partialfc.align import pipeline
from partialfc.align.faces import Face, register_detector
from partialfc.align.photos import load_photo
from partialfc.align.pipeline import JOURNAL, AlignOptions, align_folder, read_journal
from partialfc.align.report import contact_sheet
from partialfc.align.template import ARCFACE_TEMPLATE, FACE_SIZE
from partialfc.cli import main
from tests.test_align_warp import face_points, opencv_crop

H, W = 200, 240  # the photos' upright size
POINTS = face_points(48.0, 12.0, (125.0, 100.0))  # one face per photo, inside it


def texture(height: int, width: int, seed: int, sigma: float = 2.0) -> np.ndarray:
    """A photo-like uint8 RGB texture: sharp, high-contrast brightness (blurred noise) and
    smooth colour, so that the crops' JPEG chroma subsampling loses little of it."""
    rng = np.random.default_rng(seed)
    luma = cv2.GaussianBlur(rng.normal(size=(height, width)).astype(np.float32), (0, 0), sigma)
    chroma = cv2.GaussianBlur(rng.normal(size=(height, width, 3)).astype(np.float32), (0, 0), 4 * sigma)
    image = 50 * luma[..., None] / luma.std() + 20 * chroma / chroma.std()
    return np.clip(128 + image, 0, 255).round().astype(np.uint8)


def write_landmarks(path, entries: dict) -> str:
    """``path x1 y1 ... x5 y5`` lines (``%.17g``: the float64 values exactly)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("# written by test_align_pipeline\n")
        for name, points in entries.items():
            f.write(f"{name} " + " ".join(f"{v:.17g}" for v in np.asarray(points).reshape(-1)) + "\n")
    return str(path)


def save(array: np.ndarray, path, **kwargs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


def decoded(path) -> np.ndarray:
    """The photo's pixels as Pillow decodes them (no orientation applied)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def crop_at(out, name) -> np.ndarray:
    with Image.open(os.path.join(out, name)) as im:
        assert im.size == (FACE_SIZE, FACE_SIZE)
        return np.asarray(im.convert("RGB"))


def difference(crop: np.ndarray, reference: np.ndarray, margin: int = 3) -> np.ndarray:
    return np.abs(crop.astype(int) - reference.astype(int))[margin:-margin, margin:-margin]


def assert_close(crop, reference, mean: float = 1.5, level: int = 4, share: float = 0.99):
    """Crops go through JPEG (quality 100 here) and the warp's rounding: close, not equal."""
    diff = difference(crop, reference)
    assert diff.mean() < mean and (diff <= level).mean() >= share, (diff.mean(), np.percentile(diff, 99))


def journal_lines(out) -> list[str]:
    with open(os.path.join(out, JOURNAL), encoding="utf-8") as f:
        return f.readlines()


def no_tmp_files(out) -> bool:
    return not [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]


OPTIONS = dict(quality=100)


# --- every kind of photo, one run -------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG header for a ``width`` x ``height`` RGB image and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A folder of every kind of photo, its landmarks file, and the pixels each photo holds."""
    root = tmp_path_factory.mktemp("kinds")
    src = root / "photos"
    expected = {}  # photo: the RGB pixels it should be read as (upright)

    def photo(name, seed):
        expected[name] = texture(H, W, seed)
        return expected[name]

    save(photo("ana/plain.jpg", 1), src / "ana/plain.jpg", quality=95)
    save(photo("ana/missing.jpg", 2), src / "ana/missing.jpg")
    Image.fromarray(photo("ana/cmyk.jpg", 3)).convert("CMYK").save(src / "ana/cmyk.jpg", quality=100)
    gray = texture(H, W, 4)[..., 1]
    save(gray, src / "ana/gray.jpg", quality=100)
    expected["ana/gray.jpg"] = np.repeat(gray[..., None], 3, axis=2)
    (src / "ana/notes.txt").write_text("taken at the party\n")

    deep = (40 + texture(H, W, 5)[..., 0] // 2)  # 40..167: a dim 16-bit photo, not stretched
    (src / "bo").mkdir()
    cv2.imwrite(str(src / "bo/deep.png"), deep.astype(np.uint16) * 257)
    expected["bo/deep.png"] = np.repeat(deep[..., None], 3, axis=2)
    rgb16 = photo("bo/deep_rgb.png", 6)
    cv2.imwrite(str(src / "bo/deep_rgb.png"), rgb16[..., ::-1].astype(np.uint16) * 257)
    rgb, alpha = texture(H, W, 7), np.linspace(0, 255, W).round().astype(np.uint8)[None].repeat(H, 0)
    save(np.dstack([rgb, alpha]), src / "bo/alpha.png")
    a = alpha[..., None].astype(np.float64) / 255
    expected["bo/alpha.png"] = np.clip(rgb * a + 255 * (1 - a), 0, 255).round().astype(np.uint8)  # on white

    upright = texture(H, W, 8)
    for name, stored, orientation in [("upright", upright, 1), ("exif6", np.rot90(upright, 1), 6),
                                      ("exif8", np.rot90(upright, -1), 8)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(np.ascontiguousarray(stored), src / f"cy/{name}.jpg", quality=100, subsampling=0, exif=exif.tobytes())
        expected[f"cy/{name}.jpg"] = upright

    save(photo("dee/a.jpg", 9), src / "dee/a.jpg", quality=100)
    save(photo("dee/a.png", 10), src / "dee/a.png")

    (src / "eve").mkdir()
    (src / "eve/random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (src / "eve/empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    Image.fromarray(texture(H, W, 11)).save(whole, format="JPEG")
    (src / "eve/truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    png = io.BytesIO()
    Image.fromarray(texture(H, W, 12)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    start = data.find(b"IDAT") + 40
    data[start:start + 200] = bytes(200)  # damaged deflate stream
    (src / "eve/damaged.png").write_bytes(bytes(data))
    (src / "eve/bomb.png").write_bytes(png_claiming(20000, 20000))

    (src / "empty_one").mkdir()
    (src / "only_notes").mkdir()
    (src / "only_notes/readme.txt").write_text("nothing here\n")
    (src / ".hidden").mkdir()

    listed = [p for p in expected if p != "ana/missing.jpg"] + \
        ["eve/random.jpg", "eve/empty.jpg", "eve/truncated.jpg", "eve/damaged.png", "eve/bomb.png"]
    landmarks = write_landmarks(root / "landmarks.txt", {p: POINTS for p in listed})
    out = root / "out"
    report = align_folder(str(src), str(out), AlignOptions(landmarks=landmarks, **OPTIONS), workers=1, progress=False)
    return src, out, landmarks, expected, report


ALIGNED = {  # photo: its crop
    "ana/plain.jpg": "ana/plain.jpg", "ana/cmyk.jpg": "ana/cmyk.jpg", "ana/gray.jpg": "ana/gray.jpg",
    "bo/deep.png": "bo/deep.jpg", "bo/deep_rgb.png": "bo/deep_rgb.jpg", "bo/alpha.png": "bo/alpha.jpg",
    "cy/upright.jpg": "cy/upright.jpg", "cy/exif6.jpg": "cy/exif6.jpg", "cy/exif8.jpg": "cy/exif8.jpg",
    "dee/a.jpg": "dee/a.jpg", "dee/a.png": "dee/a_2.jpg",
}
SKIPPED = {
    "ana/missing.jpg": "no landmarks", "ana/notes.txt": "not an image", "only_notes/readme.txt": "not an image",
    "eve/random.jpg": "not an image", "eve/empty.jpg": "not an image", "eve/truncated.jpg": "corrupt",
    "eve/damaged.png": "corrupt", "eve/bomb.png": "too large",
}


def test_the_report_and_journal_account_for_every_file(kinds):
    src, out, _, _, report = kinds
    assert report.aligned == len(ALIGNED) and report.done_before == 0
    assert dict(report.skipped) == {reason: list(SKIPPED.values()).count(reason) for reason in set(SKIPPED.values())}
    assert report.empty_identities == ["empty_one", "only_notes"]
    assert {key: reason.split(":")[0] for key, reason in report.skipped_photos} == SKIPPED
    journal = read_journal(str(out))
    assert set(journal) == set(ALIGNED) | set(SKIPPED)
    for key, crop in ALIGNED.items():
        status, written, detail = journal[key]
        assert (status, written) == ("aligned", crop)
        values = np.array(detail.split(), np.float64)
        np.testing.assert_allclose(values[:10].reshape(5, 2), POINTS, atol=0.006)  # two decimals
    crops = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files
                   if f.endswith(".jpg"))
    assert crops == sorted(ALIGNED.values())
    assert no_tmp_files(out) and not (out / "empty_one").exists()
    assert all(line.count("\t") == 3 and line.endswith("\n") for line in journal_lines(out))


@pytest.mark.parametrize("photo", ["ana/plain.jpg", "dee/a.jpg", "dee/a.png", "cy/upright.jpg"])
def test_a_crop_is_the_warp_of_its_own_photo(kinds, photo):
    src, out, _, _, _ = kinds
    assert_close(crop_at(out, ALIGNED[photo]), opencv_crop(decoded(src / photo), POINTS))


@pytest.mark.parametrize("photo, tolerance", [("ana/cmyk.jpg", 3.0), ("ana/gray.jpg", 1.5), ("bo/deep.png", 1.0),
                                              ("bo/deep_rgb.png", 1.0), ("bo/alpha.png", 1.0)])
def test_unusual_modes_are_read_as_the_rgb_they_hold(kinds, photo, tolerance):
    """CMYK, 8-bit gray, 16-bit gray and RGB (values v * 257), alpha (composited on white)."""
    _, out, _, expected, _ = kinds
    crop = crop_at(out, ALIGNED[photo])
    assert_close(crop, opencv_crop(expected[photo], POINTS), mean=tolerance)
    if photo in ("ana/gray.jpg", "bo/deep.png"):
        assert np.abs(crop.astype(int) - crop[..., :1]).max() <= 2  # gray stays gray


@pytest.mark.parametrize("photo", ["cy/exif6.jpg", "cy/exif8.jpg"])
def test_exif_orientation_is_applied_before_the_landmarks(kinds, photo):
    src, out, _, _, _ = kinds
    stored = decoded(src / photo)
    assert stored.shape[:2] == (W, H)  # stored turned; the landmarks refer to the upright photo
    crop, upright_crop = crop_at(out, ALIGNED[photo]), crop_at(out, "cy/upright.jpg")
    assert_close(crop, upright_crop, mean=1.0)
    assert difference(crop_at(out, "cy/exif6.jpg"), crop_at(out, "cy/exif8.jpg")).mean() < 1.0
    assert difference(opencv_crop(stored, POINTS), upright_crop).mean() > 20  # (not a vacuous comparison)


def test_a_rerun_does_nothing_new(kinds):
    src, out, landmarks, _, _ = kinds
    before = journal_lines(out)
    report = align_folder(str(src), str(out), AlignOptions(landmarks=landmarks, **OPTIONS), workers=1, progress=False)
    photos = len(ALIGNED) + len([k for k in SKIPPED if not k.endswith(".txt")])
    assert report.aligned == 0 and not report.skipped and report.done_before == photos
    assert journal_lines(out) == before
    assert {key: reason.split(":")[0] for key, reason in report.skipped_photos} == SKIPPED


# --- huge photos --------------------------------------------------------------------------

def test_a_huge_jpeg_is_decoded_reduced_and_its_crop_matches_the_full_size_one(tmp_path):
    src = tmp_path / "photos"
    small = cv2.GaussianBlur(np.random.default_rng(1).normal(size=(400, 500, 3)).astype(np.float32), (0, 0), 1.5)
    small = np.clip(128 + 50 * small / small.std(), 0, 255).astype(np.uint8)
    full = cv2.resize(small, (5000, 4000), interpolation=cv2.INTER_CUBIC)  # features ~20 px: ~5 crop px
    path = save(full, src / "big/photo.jpg", quality=95)
    image, scale = load_photo(path)
    assert image.shape == (2400, 3000, 3) and scale == pytest.approx(0.6)
    points = face_points(150.0, -20.0, (2600.0, 1900.0))  # 4.3 photo px per crop px
    write_landmarks(tmp_path / "lm.txt", {"big/photo.jpg": points})
    report = align_folder(str(src), str(tmp_path / "out"), AlignOptions(landmarks=str(tmp_path / "lm.txt"), **OPTIONS),
                          workers=1, progress=False)
    assert report.aligned == 1
    # reference: the full-size photo box-averaged by 4 (of the 4.3 photo px per crop px), then warped
    area = cv2.resize(decoded(path), (1250, 1000), interpolation=cv2.INTER_AREA)
    reference = opencv_crop(area, (points + 0.5) / 4 - 0.5)
    assert_close(crop_at(tmp_path / "out", "big/photo.jpg"), reference, mean=3.0, level=8)
    assert np.abs(np.asarray(read_journal(str(tmp_path / "out"))["big/photo.jpg"][2].split()[:10], float)
                  - points.reshape(-1)).max() < 0.006  # full-size coordinates in the journal


def blob_centres(crop: np.ndarray, around: np.ndarray, radius: int = 6) -> np.ndarray:
    """The intensity centroid of the bright blob near each of the points ``around``."""
    gray = crop.astype(np.float64).mean(-1)
    centres = []
    for x, y in np.round(around).astype(int):
        window = gray[y - radius:y + radius + 1, x - radius:x + radius + 1]
        window = np.clip(window - np.median(gray), 0, None)
        yy, xx = np.mgrid[y - radius:y + radius + 1, x - radius:x + radius + 1]
        centres.append([(window * xx).sum() / window.sum(), (window * yy).sum() / window.sum()])
    return np.array(centres)


@pytest.mark.parametrize("size", [(6400, 4800), (5000, 4000)], ids=["draft-and-thumbnail", "thumbnail"])
def test_the_five_points_of_a_reduced_photo_land_on_the_template(tmp_path, size):
    """Bright dots at the landmarks of a huge photo must end at the template's points: the
    reduced decode maps pixel centres, (p + 0.5) * scale - 0.5, not p * scale."""
    width, height = size
    points = face_points(60.0, 5.0, (width * 0.55, height * 0.45))
    image = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[-16:17, -16:17]
    for x, y in points:
        cx, cy = int(round(x)), int(round(y))
        dot = 255 * np.exp(-((xx + cx - x) ** 2 + (yy + cy - y) ** 2) / (2 * 4.0 ** 2))
        image[cy - 16:cy + 17, cx - 16:cx + 17] = np.maximum(image[cy - 16:cy + 17, cx - 16:cx + 17], dot.round())
    path = save(image, tmp_path / "photos/dots/photo.jpg", quality=95)
    assert load_photo(path)[1] == pytest.approx(3000 / width)
    write_landmarks(tmp_path / "lm.txt", {"dots/photo.jpg": points})
    align_folder(str(tmp_path / "photos"), str(tmp_path / "out"), AlignOptions(landmarks=str(tmp_path / "lm.txt"),
                                                                            **OPTIONS), workers=1, progress=False)
    crop = crop_at(tmp_path / "out", "dots/photo.jpg")
    error = np.linalg.norm(blob_centres(crop, ARCFACE_TEMPLATE) - ARCFACE_TEMPLATE, axis=1)
    assert error.max() < 0.12, error


# --- list files, paths, name collisions ---------------------------------------------------

def test_a_list_file_with_spaces_and_colliding_names(tmp_path, monkeypatch):
    base = tmp_path / "lists"
    photos = {"photos dir/my face 1.jpg": 21, "photos dir/sub/a.jpg": 22, "other/a.jpg": 23}
    for name, seed in photos.items():
        save(texture(H, W, seed), base / name, quality=100)
    outside = save(texture(H, W, 24), tmp_path / "elsewhere/x y.png")
    (base / "list.txt").write_text("photos dir/my face 1.jpg alice\nphotos dir/sub/a.jpg alice\n\n"
                                   f"other/a.jpg  alice\n{outside} bob\nphotos dir/gone.jpg bob\n", encoding="utf-8")
    write_landmarks(base / "landmarks.txt", {**{name: POINTS for name in photos}, outside: POINTS,
                                             "photos dir/gone.jpg": POINTS})
    monkeypatch.chdir(base)  # the list and landmarks named relative to the working folder
    report = align_folder("list.txt", str(tmp_path / "out"), AlignOptions(landmarks="landmarks.txt", **OPTIONS),
                          workers=1, progress=False)
    assert report.aligned == 4 and dict(report.skipped) == {"unreadable": 1}
    crops = {"photos dir/my face 1.jpg": "alice/my face 1.jpg", "photos dir/sub/a.jpg": "alice/a.jpg",
             "other/a.jpg": "alice/a_2.jpg", outside: "bob/x y.jpg"}
    journal = read_journal(str(tmp_path / "out"))
    for key, crop in crops.items():
        assert journal[key][:2] == ("aligned", crop)
        assert_close(crop_at(tmp_path / "out", crop), opencv_crop(decoded(base / key), POINTS))
    assert journal["photos dir/gone.jpg"][0] == "skipped"


def test_a_relative_folder_with_absolute_landmark_paths(tmp_path, monkeypatch):
    src = tmp_path / "photos"
    save(texture(H, W, 31), src / "ana/one.jpg", quality=100)
    save(texture(H, W, 32), src / "ana/two.jpg", quality=100)
    write_landmarks(tmp_path / "lm.txt", {str(src / "ana/one.jpg"): POINTS, "ana/two.jpg": POINTS})
    monkeypatch.chdir(tmp_path)
    report = align_folder("photos", "out", AlignOptions(landmarks="lm.txt", **OPTIONS), workers=1, progress=False)
    assert report.aligned == 2 and not report.skipped
    assert_close(crop_at(tmp_path / "out", "ana/one.jpg"), opencv_crop(decoded(src / "ana/one.jpg"), POINTS))


def test_file_names_that_are_not_utf8(tmp_path):
    """A Latin-1 name (a zip from an old camera or Windows): the landmarks file names it in the
    same bytes; the journal records it and a re-run finds it done."""
    src = tmp_path / "photos"
    save(texture(H, W, 33), src / "ana/plain.jpg", quality=100)
    latin1 = os.path.join(os.fsencode(src), b"ana", b"caf\xe9.jpg")
    with open(latin1, "wb") as f:
        Image.fromarray(texture(H, W, 34)).save(f, format="JPEG", quality=100)
    with open(tmp_path / "lm.txt", "wb") as f:
        for name in (b"ana/plain.jpg", b"ana/caf\xe9.jpg"):
            f.write(name + b" " + " ".join(f"{v:.17g}" for v in POINTS.reshape(-1)).encode() + b"\n")
    (src / "ana" / os.fsdecode(b"caf\xe9 notes.txt")).write_text("x")
    options = AlignOptions(landmarks=str(tmp_path / "lm.txt"), **OPTIONS)
    report = align_folder(str(src), str(tmp_path / "out"), options, workers=1, progress=False)
    assert report.aligned == 2 and dict(report.skipped) == {"not an image": 1}
    name = os.fsdecode(b"ana/caf\xe9.jpg")
    assert read_journal(str(tmp_path / "out"))[name][:2] == ("aligned", name)
    assert_close(crop_at(tmp_path / "out", name), opencv_crop(decoded(latin1), POINTS))
    again = align_folder(str(src), str(tmp_path / "out"), options, workers=1, progress=False)
    assert (again.processed, again.done_before) == (0, 2)
    assert contact_sheet(str(tmp_path / "out"), faces=2, columns=2)


# --- the journal: resume after a kill ---------------------------------------------------------

def small_folder(tmp_path, n: int = 5):
    src = tmp_path / "photos"
    names = [f"id{i % 2}/p{i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        save(texture(H, W, 40 + i), src / name, quality=100)
    save(texture(H, W, 60), src / "id0/unlisted.jpg")
    landmarks = write_landmarks(tmp_path / "lm.txt", {name: face_points(40 + 3 * i, 10 * i, (120, 100))
                                                      for i, name in enumerate(names)})
    return src, names, AlignOptions(landmarks=landmarks, **OPTIONS)


def test_resume_after_a_kill_redoes_exactly_the_unfinished_photo(tmp_path):
    src, names, options = small_folder(tmp_path)
    out = tmp_path / "out"

    def run():
        return align_folder(str(src), str(out), options, workers=1, progress=False)

    first = run()
    assert first.aligned == len(names) and dict(first.skipped) == {"no landmarks": 1}
    crops = {name: (out / name).read_bytes() for name in names}
    second = run()
    assert (second.aligned, second.processed, second.done_before) == (0, 0, len(names) + 1)

    lines = journal_lines(out)
    last_key, _, last_crop, _ = lines[-1].split("\t")
    assert last_crop in crops
    with open(out / JOURNAL, "w", encoding="utf-8") as f:  # killed while writing the last line
        f.writelines(lines[:-1])
        f.write(lines[-1][: len(lines[-1]) // 2])
    os.remove(out / last_crop)
    third = run()
    assert (third.aligned, third.processed, third.done_before) == (1, 1, len(names))
    assert (out / last_crop).read_bytes() == crops[last_crop]
    assert journal_lines(out) == lines  # the cut line gone, the photo's whole line in its place
    fourth = run()  # the redone photo is on record: nothing is done again
    assert (fourth.aligned, fourth.processed, fourth.done_before) == (0, 0, len(names) + 1)

    with open(out / JOURNAL, "a", encoding="utf-8") as f:  # killed early in a line: part of a name
        f.write(lines[0][:3])
    fifth = run()
    assert (fifth.processed, fifth.done_before) == (0, len(names) + 1) and journal_lines(out) == lines

    os.remove(out / names[0])  # a crop lost after its line was written: done again
    sixth = run()
    assert (sixth.aligned, sixth.done_before) == (1, len(names))
    assert (out / names[0]).read_bytes() == crops[names[0]]
    assert no_tmp_files(out)


def test_retry_skipped_tries_again_what_an_earlier_run_skipped(tmp_path):
    """A photo skipped for want of landmarks stays skipped on a plain re-run (resume), and is
    aligned by a re-run with retry_skipped once the landmarks file lists it."""
    src, names, options = small_folder(tmp_path, 3)
    out = str(tmp_path / "out")
    first = align_folder(str(src), out, options, workers=1, progress=False)
    assert dict(first.skipped) == {"no landmarks": 1}
    write_landmarks(tmp_path / "lm.txt", {**{name: face_points(40 + 3 * i, 10 * i, (120, 100))
                                              for i, name in enumerate(names)}, "id0/unlisted.jpg": POINTS})
    resumed = align_folder(str(src), out, options, workers=1, progress=False)
    assert (resumed.processed, resumed.done_before) == (0, len(names) + 1)
    retried = align_folder(str(src), out, options, workers=1, progress=False, retry_skipped=True)
    assert (retried.aligned, retried.processed, retried.done_before) == (1, 1, len(names))
    assert read_journal(out)["id0/unlisted.jpg"][0] == "aligned" and not retried.skipped_photos
    assert_close(crop_at(tmp_path / "out", "id0/unlisted.jpg"), opencv_crop(decoded(src / "id0/unlisted.jpg"), POINTS))


def test_a_failed_crop_write_leaves_the_old_crop_whole(tmp_path, monkeypatch):
    src, names, options = small_folder(tmp_path, n=2)
    out = tmp_path / "out"
    align_folder(str(src), str(out), options, workers=1, progress=False)
    before = (out / names[0]).read_bytes()
    os.remove(out / JOURNAL)

    def failing(crop, quality):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "encode_jpeg", failing)
    with pytest.raises(OSError):
        align_folder(str(src), str(out), options, workers=1, progress=False)
    assert (out / names[0]).read_bytes() == before
    assert not read_journal(str(out)).get(names[0])


@pytest.mark.multiprocess
def test_two_spawned_workers_write_the_same_crops_and_journal(tmp_path):
    src, names, options = small_folder(tmp_path, n=6)
    one = align_folder(str(src), str(tmp_path / "one"), options, workers=1, progress=False)
    two = align_folder(str(src), str(tmp_path / "two"), options, workers=2, progress=False)
    assert (one.aligned, dict(one.skipped)) == (two.aligned, dict(two.skipped)) == (6, {"no landmarks": 1})
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert journal_lines(tmp_path / "one") == journal_lines(tmp_path / "two")
    assert no_tmp_files(tmp_path / "two")


# --- the detector path: several faces, small faces, none -------------------------------------

STUB = "test_align_pipeline_stub"


def box_around(points: np.ndarray, side: float) -> tuple:
    cx, cy = points.mean(0)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


GROUP = (300, 400)  # height, width of the photo of several faces
TINY = face_points(12.0, 0.0, (200.0, 150.0))  # at the very centre, but below min_face
MEDIUM = face_points(30.0, 0.0, (330.0, 240.0))
CENTRAL = face_points(36.0, -8.0, (210.0, 140.0))  # the nearest the centre of those kept
LARGEST = face_points(50.0, 15.0, (110.0, 100.0))
WIDE_FACE = face_points(20.0, 5.0, (2100.0, 150.0))  # in a 4000 x 300 photo
SCENES = {  # the red value of a photo's top-left corner: (photo width, faces in full-size photo px)
    50: (GROUP[1], [(box_around(TINY, 20.0), TINY, 0.99), (box_around(MEDIUM, 48.0), MEDIUM, 0.9),
                    (box_around(CENTRAL, 64.0), CENTRAL, 0.8),
                    (box_around(LARGEST, 90.0), LARGEST, 0.7)]),
    100: (W, [(box_around(CENTRAL, 20.0), CENTRAL, 0.9), (box_around(LARGEST, 28.0), LARGEST, 0.9)]),
    150: (W, []),
    200: (4000, [(box_around(WIDE_FACE, 40.0), WIDE_FACE, 0.95)]),
}


class StubDetector:
    """Faces by the scene code in the photo's corner, scaled to the image it is given."""

    def detect(self, image: np.ndarray) -> list[Face]:
        width, faces = SCENES[int(round(image[3, 3, 0] / 50.0)) * 50]
        s = image.shape[1] / width
        return [Face((np.array(box) + 0.5) * s - 0.5, (points + 0.5) * s - 0.5, score) for box, points, score in faces]


@pytest.fixture
def stub_detector():
    register_detector(STUB)(lambda: StubDetector())
    yield STUB
    faces_module.DETECTORS.pop(STUB, None)
    for key in [k for k in pipeline._DETECTORS if k[0] == STUB]:
        del pipeline._DETECTORS[key]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    src = tmp_path_factory.mktemp("scenes") / "photos"
    images = {}
    for code, name, (height, width) in [(50, "group.png", GROUP), (100, "small.png", (H, W)),
                                        (150, "empty.png", (H, W)), (200, "wide.png", (300, 4000))]:
        image = texture(height, width, code, sigma=4.0)
        image[:32, :32] = (code, 0, 0)
        images[f"id/{name}"] = save(image, src / "id" / name)
    return src, images


@pytest.mark.parametrize("select, chosen", [("largest", LARGEST), ("central", CENTRAL)])
def test_the_detector_path_chooses_and_skips_faces(tmp_path, stub_detector, scenes, select, chosen):
    src, images = scenes
    out = tmp_path / "out"
    options = AlignOptions(detector=stub_detector, select=select, min_face=32, **OPTIONS)
    report = align_folder(str(src), str(out), options, workers=1, progress=False)
    assert report.aligned == 2 and dict(report.skipped) == {"face too small": 1, "no face": 1}
    journal = read_journal(str(out))
    assert journal["id/small.png"][2].startswith("face too small: largest 28")
    assert journal["id/empty.png"][2] == "no face"
    group = np.array(journal["id/group.png"][2].split(), np.float64)
    np.testing.assert_allclose(group[:10].reshape(5, 2), chosen, atol=0.006)
    assert_close(crop_at(out, "id/group.jpg"), opencv_crop(decoded(images["id/group.png"]), chosen))
    # the 4000 px panorama is decoded at 3000 px: its 40 px face is still 40 px for min_face, and
    # the journal holds the full-size photo's points
    wide = np.array(journal["id/wide.png"][2].split(), np.float64)
    np.testing.assert_allclose(wide[:10].reshape(5, 2), WIDE_FACE, atol=0.02)
    assert wide[10] == pytest.approx(0.95)
    reference = opencv_crop(decoded(images["id/wide.png"]), WIDE_FACE)
    assert_close(crop_at(out, "id/wide.jpg"), reference, mean=3.0, level=10)


# --- the contact sheet --------------------------------------------------------------------

@pytest.mark.parametrize("faces, columns, rows", [(48, 8, 1), (7, 3, 3), (4, 3, 2)])
def test_the_contact_sheet_grid_shows_the_crops_and_their_points(tmp_path, faces, columns, rows):
    src, names, options = small_folder(tmp_path, n=7)
    out = tmp_path / "out"
    assert contact_sheet(str(tmp_path / "nothing")) is None
    align_folder(str(src), str(out), options, workers=1, progress=False)
    path = contact_sheet(str(out), faces=faces, columns=columns)
    assert path == str(out / "contact_sheet.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (columns * 224, rows * 224)
        sheet = np.asarray(im.convert("RGB"))
    shown = min(faces, len(names))
    for i in range(columns * rows):
        tile = sheet[(i // columns) * 224:(i // columns + 1) * 224, (i % columns) * 224:(i % columns + 1) * 224]
        if i >= shown:
            assert (tile == (40, 40, 40)).all()
            continue
        assert np.abs(tile.astype(int) - (40, 40, 40)).mean() > 20
        red = np.argwhere((tile == (255, 40, 40)).all(-1))[:, ::-1]  # (x, y) of the drawn points
        for tx, ty in ARCFACE_TEMPLATE * 2:  # the points land on the template (green crosses)
            assert np.linalg.norm(red - (tx, ty), axis=1).min() < 2.0


# --- the command line ----------------------------------------------------------------------

def test_the_command_aligns_and_prints_the_summary(tmp_path, capsys):
    src, names, options = small_folder(tmp_path, n=3)
    (src / "id1/notes.txt").write_text("x")
    out = tmp_path / "out"
    code = main(["data", "align", str(src), str(out), "--landmarks", options.landmarks, "--workers", "1",
                 "--no-progress", "--quality", "100", "--contact-sheet", "5"])
    printed = capsys.readouterr()
    assert code == 0 and "error" not in printed.err
    for row in ("aligned", "skipped: no landmarks", "skipped: not an image", "photos per second"):
        assert row in printed.out
    assert f"contact sheet: {out / 'contact_sheet.png'}" in printed.out
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size == (8 * 224, 224)
    for name in names:
        assert (out / name).is_file()


@pytest.mark.parametrize("case", ["bad landmarks line", "bad coordinate", "missing source", "missing landmarks file"])
def test_the_command_rejects_bad_input_with_one_error_line(tmp_path, capsys, case):
    src, names, options = small_folder(tmp_path, n=1)
    landmarks = options.landmarks
    if case == "bad landmarks line":
        with open(landmarks, "a", encoding="utf-8") as f:
            f.write("id0/p0.jpg 1 2 3\n")
    elif case == "bad coordinate":
        with open(landmarks, "a", encoding="utf-8") as f:
            f.write("id0/p0.jpg 1 2 3 4 5 6 7 8 9 nan\n")
    elif case == "missing landmarks file":
        landmarks = str(tmp_path / "nope.txt")
    source = str(tmp_path / "no_such_folder") if case == "missing source" else str(src)
    code = main(["data", "align", source, str(tmp_path / "out"), "--landmarks", landmarks, "--workers", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    if case.startswith("bad"):
        assert f"{landmarks}:3:" in err  # file and line number (the first line is a comment)
    assert not (tmp_path / "out" / "id0" / "p0.jpg").exists()


def test_a_confident_face_beats_a_larger_doubtful_one():
    """MTCNN's false positives on torsos and shirt prints score 0.72-0.93 and are larger than
    the face: with the detector's ``confident`` score, the face is chosen among the confident
    ones; with none confident, or no threshold, size decides as before."""
    from partialfc.align.pipeline import choose_face

    def face(side, score, x=0.0):
        return Face(np.array([x, 0.0, x + side, side]), np.zeros((5, 2)), score)

    torso, real = face(150, 0.85), face(60, 0.999, x=200)
    assert choose_face([torso, real], (400, 400), "largest", 20, confident=0.95) is real
    assert choose_face([torso, real], (400, 400), "largest", 20) is torso
    doubtful = face(50, 0.9, x=300)
    assert choose_face([torso, doubtful], (400, 400), "largest", 20, confident=0.95) is torso
    assert choose_face([torso, face(10, 0.99)], (400, 400), "largest", 20, confident=0.95) is torso  # too small


# --- what a second run meets: renamed, added and moved photos, odd names, bad landmark lines ---


def test_a_photo_added_beside_colliding_names_takes_no_other_photos_crop(tmp_path):
    """name.jpg and name.png give name.jpg and name_2.jpg; a name.bmp added later gets a new
    name, and the first two keep their crops (a re-run once gave the bmp the jpg's crop)."""
    src = tmp_path / "photos"
    points = {}
    for i, suffix in enumerate(("jpg", "png")):
        save(texture(H, W, 70 + i), src / f"bob/name.{suffix}", **({"quality": 100} if suffix == "jpg" else {}))
        points[f"bob/name.{suffix}"] = POINTS
    options = AlignOptions(landmarks=write_landmarks(tmp_path / "lm.txt", points), **OPTIONS)
    out = tmp_path / "out"
    align_folder(str(src), str(out), options, workers=1, progress=False)
    before = {name: (out / "bob" / name).read_bytes() for name in ("name.jpg", "name_2.jpg")}
    save(texture(H, W, 72), src / "bob/name.bmp")
    write_landmarks(tmp_path / "lm.txt", {**points, "bob/name.bmp": POINTS})
    again = align_folder(str(src), str(out), options, workers=1, progress=False)
    assert (again.aligned, again.done_before) == (1, 2)
    assert {name: (out / "bob" / name).read_bytes() for name in before} == before
    journal = read_journal(str(out))
    assert [journal[f"bob/name.{s}"][1] for s in ("jpg", "png", "bmp")] == ["bob/name.jpg", "bob/name_2.jpg",
                                                                             "bob/name_3.jpg"]
    assert sorted(again.crops) == ["bob/name.jpg", "bob/name_2.jpg", "bob/name_3.jpg"]


def test_the_crops_of_a_run_are_those_of_the_photos_the_source_holds_now(tmp_path):
    """A photo moved from bob to alice between runs: its old crop stays on disk, but the run's
    crops (what data prepare splits and packs) name it once, under alice."""
    src = tmp_path / "photos"
    save(texture(H, W, 80), src / "bob/x.jpg", quality=100)
    save(texture(H, W, 81), src / "alice/y.jpg", quality=100)
    options = AlignOptions(landmarks=write_landmarks(tmp_path / "lm.txt", {"bob/x.jpg": POINTS, "alice/y.jpg": POINTS,
                                                                           "alice/x.jpg": POINTS}), **OPTIONS)
    out = tmp_path / "out"
    assert sorted(align_folder(str(src), str(out), options, workers=1, progress=False).crops) == \
        ["alice/y.jpg", "bob/x.jpg"]
    os.replace(src / "bob/x.jpg", src / "alice/x.jpg")
    again = align_folder(str(src), str(out), options, workers=1, progress=False)
    assert sorted(again.crops) == ["alice/x.jpg", "alice/y.jpg"] and (out / "bob/x.jpg").exists()
    assert again.empty_identities == ["bob"]


def test_a_name_with_a_tab_or_carriage_return_survives_the_journal(tmp_path):
    """Journal fields are escaped: a tab, a carriage return (macOS's Icon\\r) or a backslash in
    a name reads back as written, so a re-run finds those photos done."""
    src = tmp_path / "photos"
    names = ["ana/a\tb.jpg", "ana/Icon\r.jpg", "ana/back\\slash.jpg"]
    for i, name in enumerate(names):
        save(texture(H, W, 90 + i), src / name, quality=100)
    (tmp_path / "lm.txt").write_text("# lists none of them\n")
    options = AlignOptions(landmarks=str(tmp_path / "lm.txt"), **OPTIONS)
    out = str(tmp_path / "out")
    first = align_folder(str(src), out, options, workers=1, progress=False)
    assert dict(first.skipped) == {"no landmarks": 3} and set(read_journal(out)) == set(names)
    again = align_folder(str(src), out, options, workers=1, progress=False)
    assert (again.processed, again.done_before) == (0, 3)


def test_placeholder_landmarks_skip_the_photo_not_the_run(tmp_path):
    src = tmp_path / "photos"
    save(texture(H, W, 95), src / "ana/good.jpg", quality=100)
    save(texture(H, W, 96), src / "ana/none.jpg", quality=100)
    options = AlignOptions(landmarks=write_landmarks(tmp_path / "lm.txt", {
        "ana/good.jpg": POINTS, "ana/none.jpg": -np.ones((5, 2))}), **OPTIONS)
    report = align_folder(str(src), str(tmp_path / "out"), options, workers=1, progress=False)
    assert report.aligned == 1 and dict(report.skipped) == {"bad landmarks": 1}


def test_a_list_file_naming_a_photo_twice_is_one_error_line(tmp_path, capsys):
    save(texture(H, W, 97), tmp_path / "a.jpg", quality=100)
    (tmp_path / "list.txt").write_text("a.jpg alice\na.jpg bob\n")
    assert main(["data", "align", str(tmp_path / "list.txt"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("list.txt:2: a.jpg is listed twice")
