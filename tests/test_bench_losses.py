"""``partialfc bench losses`` in a CI-sized setting: every seed trained, mean and sample std
of the per-seed numbers, JSON + Markdown + PNG written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from partialfc.bench.losses import summarise


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [{"accuracy": 0.8, "tar_at_far_1e3": 0.5}, {"accuracy": 0.9, "tar_at_far_1e3": 0.4},
            {"accuracy": 0.85, "tar_at_far_1e3": 0.7}]
    record = summarise("cosface", 1.0, runs)
    for key in ("accuracy", "tar_at_far_1e3"):
        values = np.array([r[key] for r in runs])
        assert record[key] == pytest.approx(values.mean()) and record[f"{key}_std"] == pytest.approx(values.std(ddof=1))
        assert record[f"{key}_per_seed"] == values.tolist()


@pytest.mark.multiprocess
def test_bench_losses_trains_every_seed_and_writes_the_outputs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "partialfc.cli", "bench", "losses", "--losses", "cosface,normface",
                           "--seeds", "2", "--identities", "16", "--images-per-identity", "4", "--pairs", "100",
                           "--epochs", "1", "--batch", "16", "--dim", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((out / "losses.json").read_text())
    assert [(r["loss"], r["seeds"]) for r in records] == [("cosface", 2), ("normface", 2)]
    for r in records:
        per_seed = [json.loads(line) for seed in range(2)
                    for line in open(out / "runs" / f"{r['loss']}-r1-s{seed}" / "metrics.jsonl")
                    if json.loads(line)["kind"] == "eval"]
        assert r["accuracy_per_seed"] == [e["accuracy"] for e in per_seed]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["command"].startswith("partialfc bench losses")
    assert "| cosface | 1 | 2 |" in (out / "losses.md").read_text() and (out / "losses.png").stat().st_size > 0
