"""Building evaluation sets: partialfc data make-bin (an LFW-style folder and pairs.txt become a
.bin holding the image files' bytes in pair order, which eval verify reads) and partialfc embed."""

import json

import numpy as np
import torch
from PIL import Image

from partialfc.cli import main
from partialfc.eval.verification import embed_images
from partialfc.data.verification_bin import read_bin
from partialfc.models import build_backbone
from tests.data_helpers import smooth_image

SAME = [("ann", 1, 2), ("bob", 1, 3), ("cyd", 2, 3), ("ann", 1, 3)]
DIFFERENT = [("ann", 1, "bob", 2), ("bob", 3, "cyd", 1), ("cyd", 2, "ann", 3), ("ann", 2, "cyd", 3)]


def lfw_folder(root):
    for k, name in enumerate(("ann", "bob", "cyd")):
        (root / name).mkdir(parents=True)
        for i in (1, 2, 3):
            Image.fromarray(smooth_image(10 * k + i)).save(root / name / f"{name}_{i:04d}.jpg", quality=90)
    lines = ["1\t4"] + [f"{n}\t{i}\t{j}" for n, i, j in SAME] + [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in DIFFERENT]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")


def test_make_bin_round_trip_through_eval_verify(tmp_path, capsys):
    lfw_folder(tmp_path / "lfw")
    out = tmp_path / "lfw.bin"
    assert main(["data", "make-bin", str(tmp_path / "lfw"), str(tmp_path / "lfw" / "pairs.txt"), str(out)]) == 0
    images, issame = read_bin(out)
    expected = [(n, i, n, j) for n, i, j in SAME] + DIFFERENT
    files = [tmp_path / "lfw" / name / f"{name}_{index:04d}.jpg" for a, i, b, j in expected
             for name, index in ((a, i), (b, j))]
    assert images == [f.read_bytes() for f in files]
    np.testing.assert_array_equal(issame, [True] * 4 + [False] * 4)

    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", 8)
    torch.save({"backbone": "iresnet_tiny", "embedding_size": 8, "options": {}, "state_dict": model.state_dict()},
               tmp_path / "bb.pt")
    capsys.readouterr()
    assert main(["eval", "verify", "--checkpoint", str(tmp_path / "bb.pt"), "--bin", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_pairs"] == 8


def test_make_bin_names_a_missing_image(tmp_path, capsys):
    lfw_folder(tmp_path / "lfw")
    (tmp_path / "lfw" / "bob" / "bob_0003.jpg").unlink()
    assert main(["data", "make-bin", str(tmp_path / "lfw"), str(tmp_path / "lfw" / "pairs.txt"),
                 str(tmp_path / "x.bin")]) == 2
    assert "bob_0003.jpg" in capsys.readouterr().err and not (tmp_path / "x.bin").exists()


def test_embed_writes_the_embeddings_of_a_folder_in_sorted_order(tmp_path):
    lfw_folder(tmp_path / "lfw")
    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", 8)
    torch.save({"backbone": "iresnet_tiny", "embedding_size": 8, "options": {}, "state_dict": model.state_dict()},
               tmp_path / "bb.pt")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(tmp_path / "lfw"), "--checkpoint", str(tmp_path / "bb.pt"), "--out", str(out),
                 "--batch-size", "4"]) == 0
    files = sorted((tmp_path / "lfw").glob("*/*.jpg"))
    assert (tmp_path / "emb.npy.txt").read_text().split() == [str(f) for f in files]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files]))
    np.testing.assert_allclose(np.load(out), embed_images(model.eval(), images).numpy(), atol=1e-6)
