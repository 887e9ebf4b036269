"""Verification metrics against a direct implementation of the protocol in formats.md."""

import numpy as np
import torch

from partialfc.eval.verification import embed_images, tar_at_far, verification_metrics


def reference_accuracy(emb, issame, folds=10):
    """Brute force: for each fold try every threshold 0..4 step 0.01 on the other folds."""
    d = np.array([np.sum((emb[2 * i] - emb[2 * i + 1]) ** 2) for i in range(len(issame))])
    n, accs = len(issame), []
    bounds = [n * f // folds for f in range(folds + 1)]
    sizes = [bounds[f + 1] - bounds[f] for f in range(folds)]
    sizes.sort(reverse=True)  # KFold: the first n % folds folds are one larger
    start = 0
    for size in sizes:
        test = list(range(start, start + size))
        start += size
        train = [i for i in range(n) if i not in test]
        best_t, best_acc = None, -1
        for k in range(400):
            t = k * 0.01
            acc = np.mean([(d[i] < t) == issame[i] for i in train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean([(d[i] < best_t) == issame[i] for i in test]))
    return np.mean(accs)


def test_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    issame = np.arange(53) % 2 == 0
    emb = rng.normal(size=(106, 8))
    emb[1::2][issame] = emb[0::2][issame] + rng.normal(scale=0.7, size=(issame.sum(), 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    result = verification_metrics(emb, issame)
    assert abs(result.accuracy - reference_accuracy(emb, issame)) < 1e-12
    assert 0.6 < result.accuracy < 1.0 and result.num_pairs == 53


def test_tar_at_far_counts_genuine_pairs_below_the_impostor_quantile():
    dist2 = np.array([0.1, 0.5, 0.9, 0.3, 0.6, 1.2, 2.0])
    issame = np.array([True, True, True, False, False, False, False])
    assert tar_at_far(dist2, issame, far=0.0) == 1 / 3  # threshold = smallest impostor 0.3
    assert tar_at_far(dist2, issame, far=0.25) == 2 / 3  # one impostor allowed: 0.6


def test_embeddings_sum_the_flip_and_are_normalised():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    out = embed_images(model, images, batch_size=2)
    x = images.float() / 127.5 - 1
    expected = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1)
    torch.testing.assert_close(out, expected.detach())
