"""Synthetic identities, the verification .bin, and the dataset tools (pack/check/shuffle)."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
from PIL import Image

from partialfc.cli import main
from partialfc.data.dataset_index import HEADER, PLAIN, open_dataset
from partialfc.data.images import decode_image
from partialfc.data.recordio import RecordReader, unpack_payload
from partialfc.data.synthetic import write_synthetic_dataset
from partialfc.data.tools import check_dataset, pack_folder, shuffle_dataset
from partialfc.data.verification_bin import load_bin_images, read_bin, write_bin
from tests.data_helpers import smooth_image, write_unique_label_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("synth") / "s"
    return write_synthetic_dataset(prefix, num_identities=12, images_per_identity=10, verification_identities=6,
                                   verification_pairs=40, seed=1, workers=2, progress=False)


def _images(dataset) -> np.ndarray:
    reader = RecordReader(dataset.rec_path)
    return np.stack([decode_image(unpack_payload(reader.read_at(int(o))[0])[2]) for o in dataset.offsets])


def test_synthetic_dataset_layout(synth):
    ds = open_dataset(synth.rec_path)
    assert (ds.flavour, ds.num_images, ds.num_classes) == (HEADER, 120, 12)
    assert ds.labels.tolist() == [i // 10 for i in range(120)]
    assert _images(ds).shape == (120, 112, 112, 3)


def _nearest_class_mean(features: np.ndarray, classes: int, per_class: int, train: int) -> float:
    """Accuracy of nearest class mean: class means of the first ``train`` views of each class,
    tested on the other views."""
    f = features.reshape(classes, per_class, -1)
    means = f[:, :train].mean(1)
    test = f[:, train:].reshape(-1, f.shape[-1])
    pred = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == np.repeat(np.arange(classes), per_class - train)).mean())


def _downsample(images: np.ndarray, size: int = 16) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR), np.float32).ravel()
                     for im in images])


def test_synthetic_identities_are_learnable_but_not_by_colour(synth):
    """Identity is geometry (where the parts are, their shapes), not colour: per-image colour
    jitter and a random background make mean colour useless (near chance, 1/12), while nearest
    class mean on a structural feature (a downsampled edge map, a far weaker learner than a CNN)
    separates identities on held-out views; views of one identity differ strongly in pixels."""
    ds = open_dataset(synth.rec_path)
    images = _images(ds)
    colour = images.reshape(120, -1, 3).mean(1)
    assert _nearest_class_mean(colour, 12, 10, 6) < 0.3
    grey = images.astype(np.float32).mean(-1)
    edges = np.hypot(np.diff(grey, axis=2)[:, :-1], np.diff(grey, axis=1)[:, :, :-1])
    edge_maps = np.stack([np.asarray(Image.fromarray(e).resize((16, 16), Image.BILINEAR)).ravel() for e in edges])
    assert _nearest_class_mean(edge_maps, 12, 10, 6) > 0.6
    # raw downsampled pixels are a weak template: the background and colour jitter dominate
    assert _nearest_class_mean(_downsample(images), 12, 10, 6) < _nearest_class_mean(edge_maps, 12, 10, 6)
    small = _downsample(images).reshape(12, 10, -1)
    assert np.abs(small[:, 0] - small[:, 1]).mean() > 20  # augmentation really varies the views


def _write_in_daemon(prefix: str) -> None:
    write_synthetic_dataset(prefix, 3, 2, verification_identities=2, verification_pairs=4, workers=2, progress=False)


@pytest.mark.multiprocess
def test_synthetic_writes_inside_daemonic_process(tmp_path):
    """A daemonic process may not have children: the writer then works in-process."""
    process = multiprocessing.get_context("fork").Process(target=_write_in_daemon, args=(str(tmp_path / "d"),),
                                                         daemon=True)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert open_dataset(tmp_path / "d").num_images == 6 and len(read_bin(tmp_path / "d.bin")[1]) == 4


def test_verification_bin(synth, tmp_path):
    images, issame = read_bin(synth.bin_path)
    assert len(images) == 80 and issame.tolist() == [True, False] * 20
    decoded, issame2 = load_bin_images(synth.bin_path)
    assert decoded.shape == (80, 3, 112, 112) and decoded.dtype == np.uint8 and (issame2 == issame).all()
    # Python-2 style files hold numpy byte arrays; read with encoding="bytes"
    legacy = tmp_path / "legacy.bin"
    with open(legacy, "wb") as f:
        pickle.dump(([np.frombuffer(b, np.uint8) for b in images[:4]], [True, False]), f, protocol=2)
    assert read_bin(legacy)[0] == images[:4]
    with pytest.raises(ValueError, match="2 per pair"):
        write_bin(tmp_path / "x.bin", images[:3], [True, False])


def test_pack_check_shuffle(tmp_path):
    src = tmp_path / "faces"
    counts = {"bob": 3, "alice": 2, "carol": 4}
    for name, n in counts.items():
        (src / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(smooth_image(hash((name, i)) % 1000, size=120)).save(src / name / f"{i}.png")
    (src / "empty").mkdir()
    packed = pack_folder(str(src), str(tmp_path / "p"), workers=2, progress=False)
    assert (packed.num_images, packed.num_classes, packed.skipped) == (9, 3, [])
    ds = open_dataset(tmp_path / "p")
    assert ds.flavour == HEADER and ds.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]  # alice, bob, carol
    assert (tmp_path / "p.names").read_text().split() == ["alice", "bob", "carol"]
    assert _images(ds).shape == (9, 112, 112, 3)

    report = check_dataset(str(tmp_path / "p.rec"), workers=1, progress=False)
    assert (report.num_images, report.num_classes, report.label_range, report.bad_records) == (9, 3, (0, 2), [])

    assert shuffle_dataset(str(tmp_path / "p"), str(tmp_path / "q"), seed=0, progress=False) == 9
    shuffled = open_dataset(tmp_path / "q")
    assert shuffled.flavour == PLAIN and sorted(shuffled.labels.tolist()) == ds.labels.tolist()
    assert shuffled.labels.tolist() != ds.labels.tolist()
    originals = {bytes(RecordReader(ds.rec_path).read_at(int(o))[0]) for o in ds.offsets}
    assert {bytes(RecordReader(shuffled.rec_path).read_at(int(o))[0]) for o in shuffled.offsets} == originals


def _cli(*argv) -> int:
    return main(["data", *map(str, argv)])


def test_cli_check_lists_corrupt_records(tmp_path, capsys):
    write_unique_label_dataset(tmp_path / "u", 30)
    assert _cli("check", tmp_path / "u.rec") == 0
    out = capsys.readouterr().out
    assert "images: 30" in out and "classes: 30" in out and "labels: 0..29" in out
    # corrupt record 4's JPEG in place (same length, so the container stays valid)
    reader = RecordReader(tmp_path / "u.rec", tmp_path / "u.idx")
    offset = reader.offset_of[4]
    payload = reader.read(4)
    data = bytearray((tmp_path / "u.rec").read_bytes())
    start = offset + 8 + 24  # the JPEG's SOI and APP0 markers
    data[start:start + 8] = b"garbage!"
    (tmp_path / "u.rec").write_bytes(bytes(data))
    assert payload != RecordReader(tmp_path / "u.rec", tmp_path / "u.idx").read(4)
    assert _cli("check", tmp_path / "u") == 1
    out = capsys.readouterr().out
    assert "record 4" in out and "1 bad record" in out


def test_cli_synth_and_index(tmp_path, capsys):
    assert _cli("synth", tmp_path / "s", "--identities", 5, "--images-per-identity", 4,
                "--verification-pairs", 10, "--verification-identities", 3, "--shuffle") == 0
    ds = open_dataset(tmp_path / "s")
    assert (ds.flavour, ds.num_images, ds.num_classes) == (PLAIN, 20, 5)
    assert len(read_bin(tmp_path / "s.bin")[1]) == 10
    assert _cli("pack", tmp_path / "missing", tmp_path / "x") == 2
    assert _cli("index", tmp_path / "h") == 2  # no such dataset
    write_unique_label_dataset(tmp_path / "u", 3)
    assert _cli("index", tmp_path / "u") == 0
    assert (tmp_path / "u.dali.idx").read_text() == (tmp_path / "u.idx").read_text()  # plain: all records
    write_synthetic_dataset(tmp_path / "h", 2, 3, verification_pairs=0, workers=1, progress=False)
    assert _cli("index", tmp_path / "h.rec", "--out", tmp_path / "h.images.idx") == 0
    lines = (tmp_path / "h.images.idx").read_text().split("\n")[:-1]
    assert [int(line.split("\t")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]  # no header/identity records
