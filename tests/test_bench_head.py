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
        assert r["status"] == "ok" and r["step_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["memory_source"] == "tensor_accounting" and r["peak_rss_mb"] >= 0
    assert {(r["method"], r["world_size"]) for r in records} == {
        ("full_softmax", 2), ("partialfc", 2), ("dsoftmax_b", 2)}
    assert [r["sample_rate"] for r in records if r["method"] == "dsoftmax_b"] == [0.0]
    table = (tmp_path / "tiny.md").read_text()
    assert table.count("\n| partialfc |") == 2 and "| full_softmax |" in table
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _points(peak_mb, classes=(10_000, 100_000, 1_000_000), status="ok"):
    return [dict(method="partialfc", sample_rate=0.1, world_size=2, dim=512, classes=c, peak_mem_mb=peak_mb(c),
                 memory_source="allocator", status=status) for c in classes]


def test_capacity_fit_recovers_a_linear_memory_model():
    from partialfc.bench.capacity import capacity

    (fit,) = capacity(_points(lambda c: 100 + 0.002 * c), budget_mb=1100)
    assert fit["status"] == "ok" and fit["source"] == "allocator" and fit["points"] == 3
    assert fit["max_classes"] == pytest.approx(500_000, rel=1e-9)
    assert fit["mb_per_million_classes"] == pytest.approx(2000)
    assert fit["bytes_per_class"] == pytest.approx(0.002 * 2**20) and fit["fixed_mb"] == pytest.approx(100)
    # centre + momentum, fp32, dim 512, half of the classes on each of the two ranks
    assert fit["analytic_bytes_per_class"] == 2 * 512 * 4 / 2
    assert fit["ratio_to_analytic"] == pytest.approx(0.002 * 2**20 / 2048)


def test_capacity_says_why_there_is_no_fit():
    from partialfc.bench.capacity import capacity

    def status(records):
        (fit,) = capacity(records, budget_mb=1100)
        assert fit["max_classes"] is None and fit["bytes_per_class"] is None
        return fit["status"]

    line = _points(lambda c: 100 + 0.002 * c)
    assert status(line[:1]) == "no_fit: needs two class counts that ran, has 1"
    assert status(line[:1] + _points(lambda c: float("nan"), (2_000_000,), "oom")) == (
        "no_fit: needs two class counts that ran, has 1; the others: oom")
    assert status(_points(lambda c: 500 - 1e-4 * c)).startswith("no_fit: peak memory does not grow")
    mixed = line[:1] + [dict(line[1], memory_source="tensor_accounting")]
    assert status(mixed).startswith("no_fit: the points were measured by different sources")


def _cfg(classes, method="partialfc", rate=0.1):
    return dict(method=method, classes=classes, rate=rate, world_size=1, batch=32, dim=16, device="cpu",
                dtype="fp32", steps=1, threads=1)


def test_tensor_accounting_is_repeatable_and_counts_the_class_state():
    """The CPU peak is the live tensors' bytes: the same number on every run, whatever the
    load, and growing with the classes by at least the centres and their momentum."""
    import torch

    from partialfc.bench.head import _measure

    threads = torch.get_num_threads()
    try:
        small, again, large = (_measure(0, 1, _cfg(c)) for c in (2_000, 2_000, 4_000))
    finally:
        torch.set_num_threads(threads)
    assert small[2] == "tensor_accounting" and small[1] == again[1]
    per_class = (large[1] - small[1]) / 2_000
    assert 2 * 16 * 4 <= per_class <= 4 * 2 * 16 * 4
    assert small[1] >= 2_000 * 2 * 16 * 4


def test_cuda_configurations_share_one_process_triton_last():
    from partialfc.bench.head import _groups

    cuda = [dict(_cfg(c, m), device="cuda") for c in (1e6, 1e7) for m in ("partialfc_triton", "partialfc")]
    wide = dict(_cfg(1e6), device="cuda", world_size=2)
    groups = _groups(cuda + [wide])
    assert [len(g) for g in groups] == [4, 1] and groups[1][0] is wide
    assert [c["method"] for c in groups[0]] == ["partialfc", "partialfc", "partialfc_triton", "partialfc_triton"]
    cpu = [_cfg(c) for c in (1e3, 2e3)]
    assert _groups(cpu) == [[cpu[0]], [cpu[1]]]  # on CPU each in its own process (its RSS its own)


def test_full_softmax_reference_is_cosface_cross_entropy():
    import torch
    import torch.nn.functional as F

    from partialfc.bench.common import MARGIN, SCALE, full_softmax_cosface

    cos = torch.rand(6, 40) * 2 - 1
    y = torch.randint(0, 40, (6,))
    naive = F.cross_entropy(SCALE * (cos - MARGIN * F.one_hot(y, 40)), y)
    torch.testing.assert_close(full_softmax_cosface(cos, y), naive)
