"""From photos to a training set and a score: ``data prepare`` (align, hold out identities as
a ``.bin``, pack the rest), the ``partialfc train`` line it prints, run as printed, and
``eval verify --pairs`` over the raw photos. Photos are textures written by the test, their
five points given by a landmarks file, so no detector is needed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partialfc.cli import main
from partialfc.data.dataset_index import open_dataset
from partialfc.data.verification_bin import read_bin
from tests.test_align_pipeline import save, texture, write_landmarks
from tests.test_align_warp import face_points

REPO = Path(__file__).resolve().parents[1]
IDENTITIES, PHOTOS = [f"person{k}" for k in range(6)], 4
PAIRS = "".join([f"person{k}\t{1 + k % 3}\t4\n" for k in range(5)]  # LFW's pairs.txt: 5 same, 5 different
                + [f"person{k}\t{1 + k % 4}\tperson{(k + 3) % 6}\t{4 - k % 4}\n" for k in range(5)])


def photo_tree(root: Path) -> tuple[Path, str, dict]:
    """``root/photos/<person>/<person>_000i.jpg`` (LFW's naming, so eval verify reads them too)
    and the landmarks file; returns the folder, the file and ``{relative path: points}``."""
    points = {}
    for k, person in enumerate(IDENTITIES):
        for i in range(1, PHOTOS + 1):
            name = f"{person}/{person}_{i:04d}.jpg"
            save(texture(160, 180, 100 * k + i), root / "photos" / name, quality=95)
            points[name] = face_points(36.0 + 2 * i, 5.0 * (i - 2), (90.0, 80.0))
    return root / "photos", write_landmarks(root / "lm.txt", points), points


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    photos, landmarks, _ = photo_tree(root)
    out = root / "prepared"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["data", "prepare", str(photos), str(out), "--landmarks", landmarks, "--val-identities", "2",
                     "--pairs", "10", "--workers", "1", "--no-progress"]) == 0
    return root, out, printed.getvalue()


def test_prepare_holds_out_identities_as_pairs_and_packs_the_rest(prepared):
    root, out, stdout = prepared
    held_out = sorted(set(IDENTITIES) - set((out / "train.names").read_text().split()))
    assert len(held_out) == 2
    dataset = open_dataset(str(out / "train"))
    assert (dataset.num_images, dataset.num_classes) == ((len(IDENTITIES) - 2) * PHOTOS, len(IDENTITIES) - 2)
    assert sorted(np.bincount(dataset.labels).tolist()) == [PHOTOS] * (len(IDENTITIES) - 2)
    images, issame = read_bin(out / "val.bin")
    pairs = [line.split("\t") for line in (out / "val_pairs.tsv").read_text().splitlines()]
    assert len(pairs) == len(issame) == 10 and issame.sum() == 5  # half of one person, half of two
    for (a, b, same), flag, first, second in zip(pairs, issame, images[0::2], images[1::2]):
        assert same == str(int(flag)) and (a.split("/")[0] == b.split("/")[0]) == bool(flag) and a != b
        assert {a.split("/")[0], b.split("/")[0]} <= set(held_out)
        assert (first, second) == ((out / "aligned" / a).read_bytes(), (out / "aligned" / b).read_bytes())
    assert len({(a, b) for a, b, _ in pairs}) == 10
    order = [bool(int(s)) for *_, s in pairs]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # shuffled: both kinds in every fold
    assert not list(out.glob("train.sorted*"))
    assert f"partialfc train photos data.rec={out / 'train'} 'eval.bins=[{out / 'val.bin'}]'" in stdout


@pytest.mark.multiprocess
def test_the_printed_train_line_trains_and_eval_verify_scores_the_photos(prepared, tmp_path, capsys):
    """The line prepare prints, run as printed (plus a short schedule), ends with accuracy:;
    eval verify --pairs then scores the run on the raw photos."""
    root, out, stdout = prepared
    line = next(s.strip() for s in stdout.splitlines() if s.strip().startswith("partialfc train"))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "partialfc.cli", *shlex.split(line)[1:], f"run_dir={run_dir}",
               "train.max_steps=2", "data.batch_size=8", "eval.every_steps=0", "checkpoint.every_steps=0",
               "log.plot=false"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("accuracy: ")

    photos = root / "photos"
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("1\t10\n" + PAIRS)
    capsys.readouterr()
    assert main(["eval", "verify", "--checkpoint", str(run_dir), "--pairs", str(pairs_txt), "--images", str(photos),
                 "--landmarks", str(root / "lm.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_pairs"] == 10 and 0.0 <= result["accuracy"] <= 1.0


def test_eval_verify_scores_photo_pairs_like_a_bin_of_their_crops(prepared, tmp_path, capsys):
    """Without training: a freshly built backbone saved as an export scores the photo pairs
    exactly as it scores a .bin of the same crops; a photo the landmarks do not list is
    centre-cropped and named, not dropped."""
    import torch

    from partialfc.eval.export import write_exported
    from partialfc.models import build_backbone
    root, _, _ = prepared
    torch.manual_seed(0)
    model_path = tmp_path / "tiny.pt"
    write_exported({"backbone": "iresnet_tiny", "embedding_size": 32, "options": {},
                    "state_dict": build_backbone("iresnet_tiny", 32).state_dict()}, str(model_path))
    photos = root / "photos"
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text(PAIRS)
    lm = tmp_path / "partial.txt"
    lines = [s for s in (root / "lm.txt").read_text().splitlines() if not s.startswith("person3/person3_0004")]
    lm.write_text("\n".join(lines) + "\n")
    model_args = ["--checkpoint", f"{model_path}", "--json"]
    assert main(["eval", "verify", *model_args, "--pairs", str(pairs_txt), "--images", str(photos),
                 "--landmarks", str(lm)]) == 0
    out = capsys.readouterr().out
    assert "person3_0004.jpg: no landmarks; its centre square is used" in out
    from_photos = json.loads(out.strip().splitlines()[-1])
    aligned = tmp_path / "aligned"
    main(["data", "align", str(photos), str(aligned), "--landmarks", str(lm), "--workers", "1", "--no-progress",
          "--contact-sheet", "0"])
    with Image.open(photos / "person3/person3_0004.jpg") as im:  # the centre square, by hand
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im.convert("RGB").crop((left, top, left + side, top + side)).resize((112, 112), Image.BILINEAR) \
            .save(aligned / "person3/person3_0004.png")
    (aligned / "person3/person3_0004.png").rename(aligned / "person3/person3_0004.jpg")  # make-bin reads by name
    capsys.readouterr()
    assert main(["data", "make-bin", str(aligned), str(pairs_txt), str(tmp_path / "same.bin")]) == 0
    assert main(["eval", "verify", *model_args, "--bin", str(tmp_path / "same.bin")]) == 0
    from_bin = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "accuracy_std", "tar_at_far_1e3", "num_pairs"):
        assert from_photos[key] == pytest.approx(from_bin[key], abs=1e-12), key


def test_too_many_held_out_identities_is_one_error_line(tmp_path, capsys):
    photos, landmarks, _ = photo_tree(tmp_path)
    code = main(["data", "prepare", str(photos), str(tmp_path / "out"), "--landmarks", landmarks,
                 "--val-identities", "5", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --val-identities 5")


def test_fewer_than_ten_pairs_or_an_empty_pairs_file_is_one_error_line(tmp_path, capsys):
    photos, landmarks, _ = photo_tree(tmp_path)
    code = main(["data", "prepare", str(photos), str(tmp_path / "out"), "--landmarks", landmarks,
                 "--val-identities", "2", "--pairs", "5", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "10 or more pairs" in err[0]
    (tmp_path / "pairs.txt").write_text("10\t300\n")
    from partialfc.align.pairs import align_pairs
    from partialfc.errors import InputError
    with pytest.raises(InputError, match="no pairs"):
        align_pairs(str(photos), str(tmp_path / "pairs.txt"))


def test_same_person_pairs_are_drawn_person_first():
    """One held-out person with 200 faces and nine with 10: the same-person pairs spread over the
    people (drawn person first), not 90% from the one with most photos."""
    from partialfc.align.prepare import sample_pairs
    faces = {"big": [f"big/{i}.jpg" for i in range(200)], **{f"p{k}": [f"p{k}/{i}.jpg" for i in range(10)]
                                                             for k in range(9)}}
    pairs = sample_pairs(faces, 200, np.random.default_rng(0))
    same = [a.split("/")[0] for a, b, s in pairs if s]
    assert len(same) == 100 and same.count("big") < 25 and len(set(same)) == 10
    assert len(pairs) == len(set(pairs)) == 200
    assert all((a.split("/")[0] == b.split("/")[0]) == s for a, b, s in pairs)
