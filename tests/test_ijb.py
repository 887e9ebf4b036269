"""IJB-B/C 1:1 protocol on a small synthetic set in the public release layout, against an
independent numpy computation: alignment by a least-squares similarity and bilinear sampling
written here, media means, template sums, cosine scores, TAR at FAR by counting."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from partialfc.cli import main
from partialfc.eval.ijb import ARCFACE_TEMPLATE, align_face, evaluate_ijb, similarity_transform
from partialfc.eval.verification import embed_images
from partialfc.models import build_backbone
from tests.data_helpers import smooth_image


def numpy_align(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 (3, 112, 112): the similarity x_out = s R x_in + t fitted by least squares (a, b, tx,
    ty with x' = a x - b y + tx, y' = b x + a y + ty), each output pixel sampled bilinearly at its
    preimage (pixel centres at integer coordinates, zero outside)."""
    rows = []
    for (x, y) in landmarks:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), ARCFACE_TEMPLATE.ravel(), rcond=None)[0]
    forward = np.array([[a, -b], [b, a]])
    ys, xs = np.mgrid[0:112, 0:112]
    src = np.linalg.solve(forward, np.stack([xs.ravel() - tx, ys.ravel() - ty]))
    x, y = src
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    h, w = image.shape[:2]

    def at(yy, xx):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return np.where(inside[:, None], image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0).astype(float)

    out = (at(y0, x0) * ((1 - fx) * (1 - fy))[:, None] + at(y0, x0 + 1) * (fx * (1 - fy))[:, None]
           + at(y0 + 1, x0) * ((1 - fx) * fy)[:, None] + at(y0 + 1, x0 + 1) * (fx * fy)[:, None])
    return np.round(out).clip(0, 255).astype(np.uint8).reshape(112, 112, 3).transpose(2, 0, 1)


def random_landmarks(rng):
    angle, scale, shift = rng.uniform(-0.3, 0.3), rng.uniform(1.0, 1.3), rng.uniform(50, 60, 2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_TEMPLATE @ rotation.T) * scale + shift + rng.normal(0, 0.5, (5, 2))


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([3.0, -8.0])
    m = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(similarity_transform(src, src @ m.T + shift), np.hstack([m, shift[:, None]]),
                               atol=1e-10)


def test_alignment_matches_bilinear_sampling_of_the_least_squares_similarity():
    rng = np.random.default_rng(1)
    for seed in range(3):
        image, landmarks = smooth_image(seed, 260), random_landmarks(rng)
        ours = align_face(Image.fromarray(image), landmarks).astype(int)
        ref = numpy_align(image, landmarks).astype(int)
        assert np.abs(ours - ref).max() <= 1


@pytest.fixture(scope="module")
def ijb_dir(tmp_path_factory):
    """IJBC layout: 8 templates of 4 subjects, 1-3 medias each of 1-3 faces; all template pairs."""
    root = tmp_path_factory.mktemp("IJBC")
    (root / "meta").mkdir()
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(2)
    faces, media = [], 100
    for template in range(1, 9):
        for _ in range(rng.integers(1, 4)):
            media += 1
            for _ in range(rng.integers(1, 4)):
                name = f"{len(faces) + 1}.jpg"
                subject = (template - 1) // 2
                image = smooth_image(1000 * subject + int(rng.integers(3)), 260)
                Image.fromarray(image).save(root / "loose_crop" / name, quality=95)
                faces.append((name, template, media, random_landmarks(rng), rng.uniform(0.5, 1.0)))
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m, _, _ in faces))
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(f'{v:.4f}' for v in lm.ravel())} {s:.4f}\n" for n, _, _, lm, s in faces))
    pairs = [(a, b, int((a - 1) // 2 == (b - 1) // 2)) for a in range(1, 9) for b in range(a + 1, 9)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    return root


def reference_protocol(model, root, flip, detector_score):
    """Scores and TARs of the protocol, computed directly from the files. The faces are aligned
    by :func:`align_face` (checked against :func:`numpy_align` above to one grey level: an
    untrained network turns such rounding into score differences of 1e-2)."""
    lines = [line.split() for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    tid_mid = {n: (int(t), int(m)) for n, t, m in
               (line.split() for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines())}
    aligned = np.stack([align_face(Image.open(root / "loose_crop" / p[0]), np.array(p[1:11], float).reshape(5, 2))
                        for p in lines])
    x = torch.from_numpy(aligned).float() / 127.5 - 1
    with torch.no_grad():
        f = model(x) + (model(torch.flip(x, dims=[3])) if flip else 0)
    f = f.double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    if detector_score:
        f *= np.array([float(p[11]) for p in lines])[:, None]
    medias = {}
    for p, feature in zip(lines, f):
        medias.setdefault(tid_mid[p[0]], []).append(feature)
    templates = {}
    for (t, _), members in medias.items():
        templates[t] = templates.get(t, 0) + np.mean(members, axis=0)
    pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=int)
    unit = {t: v / np.linalg.norm(v) for t, v in templates.items()}
    scores = np.array([unit[a] @ unit[b] for a, b, _ in pairs])
    genuine, impostor = scores[pairs[:, 2] == 1], np.sort(scores[pairs[:, 2] == 0])[::-1]
    tars = {}
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        k = int(np.floor(far * len(impostor)))  # at most k impostors may pass
        tars[f"{far:.0e}"] = float(np.mean(genuine > impostor[k]))
    return scores, tars


@pytest.mark.parametrize("flip, detector_score", [(True, False), (False, True)])
def test_ijb_protocol_equals_the_numpy_reference(ijb_dir, flip, detector_score):
    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", 16).eval()
    result = evaluate_ijb(model, str(ijb_dir), "IJBC", flip=flip, detector_score=detector_score, batch_size=7)
    scores, tars = reference_protocol(model, ijb_dir, flip, detector_score)
    np.testing.assert_allclose(result.scores, scores, atol=1e-5)
    assert result.tar_at_far == tars
    assert result.num_pairs == 28 and result.labels.sum() == 4


def test_eval_ijb_command_writes_json_and_roc(ijb_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", 16)
    torch.save({"backbone": "iresnet_tiny", "embedding_size": 16, "options": {}, "state_dict": model.state_dict()},
               tmp_path / "bb.pt")
    assert main(["eval", "ijb", "--dataset-dir", str(ijb_dir), "--target", "IJBC", "--checkpoint",
                 str(tmp_path / "bb.pt"), "--out", str(tmp_path / "report")]) == 0
    assert "TAR at FAR 1e-06" in capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "ijbc.json").read_text())
    assert report["num_pairs"] == 28 and set(report["tar_at_far"]) == {"1e-06", "1e-05", "1e-04", "1e-03",
                                                                       "1e-02", "1e-01"}
    assert (tmp_path / "report" / "ijbc_roc.png").stat().st_size > 1000
    assert main(["eval", "ijb", "--dataset-dir", str(tmp_path), "--checkpoint", str(tmp_path / "bb.pt")]) == 2
    assert "ijbc_face_tid_mid.txt not found" in capsys.readouterr().err


def test_embed_images_accepts_lazily_decoded_faces_and_no_flip():
    images = torch.from_numpy(np.stack([smooth_image(s).transpose(2, 0, 1) for s in range(5)]))
    model = build_backbone("iresnet_tiny", 8).eval()
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(images.float() / 127.5 - 1), dim=1)
    torch.testing.assert_close(embed_images(model, images, batch_size=2, flip=False), want)
