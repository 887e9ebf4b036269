"""``partialfc bench head`` writes complete records, a table and a plot (tiny sizes; the
numbers themselves are not asserted - performance lives in benchmarks, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

REQUIRED_FIELDS = {"method", "classes", "sample_rate", "world_size", "global_batch", "step_s", "peak_mem_mb"}


@pytest.mark.required
@pytest.mark.multiprocess
def test_bench_head_writes_json_table_and_png(tmp_path):
    cmd = [sys.executable, "-m", "partialfc.cli", "bench", "head", "--classes", "500", "--sample-rate",
           "1.0,0.25", "--methods", "full_softmax,partialfc,dsoftmax_b", "--batch", "32", "--dim", "16", "--steps", "1", "--nproc", "2", "--out", str(tmp_path),
           "--name", "tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "tiny.json").read_text())
    assert len(records) == 4  # reference + 2 rates + D-Softmax-B
    for r in records:
        assert REQUIRED_FIELDS <= set(r), r
        assert r["status"] == "ok" and r["step_s"] > 0 and r["peak_mem_mb"] >= 0
    assert {(r["method"], r["world_size"]) for r in records} == {
        ("full_softmax", 2), ("partialfc", 2), ("dsoftmax_b", 2)}
    assert [r["sample_rate"] for r in records if r["method"] == "dsoftmax_b"] == [0.0]
    table = (tmp_path / "tiny.md").read_text()
    assert table.count("\n| partialfc |") == 2 and "| full_softmax |" in table
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_capacity_fit_recovers_a_linear_memory_model():
    from partialfc.bench.head import capacity

    records = [dict(method="partialfc", sample_rate=0.1, world_size=2, classes=c, peak_mem_mb=100 + 0.002 * c,
                    status="ok") for c in (10_000, 100_000, 1_000_000)]
    (fit,) = capacity(records, budget_mb=1100)
    assert fit["max_classes"] == pytest.approx(500_000, rel=1e-9)
    assert fit["mb_per_million_classes"] == pytest.approx(2000)
    assert capacity(records[:1], budget_mb=1100) == []  # one point: no fit


def test_full_softmax_reference_is_cosface_cross_entropy():
    import torch
    import torch.nn.functional as F

    from partialfc.bench.common import MARGIN, SCALE, full_softmax_cosface

    cos = torch.rand(6, 40) * 2 - 1
    y = torch.randint(0, 40, (6,))
    naive = F.cross_entropy(SCALE * (cos - MARGIN * F.one_hot(y, 40)), y)
    torch.testing.assert_close(full_softmax_cosface(cos, y), naive)
