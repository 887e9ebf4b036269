"""``partialfc bench data`` writes its JSON, Markdown table and PNG."""

from __future__ import annotations

import importlib.util
import json

import pytest

from partialfc.cli import main


def test_bench_data_writes_outputs(tmp_path):
    assert main(["bench", "data", "--out", str(tmp_path), "--identities", "4", "--images-per-identity", "8",
                 "--batch", "8", "--batches", "2", "--warmup", "1", "--workers", "0", "--dali-threads", "1"]) == 0
    records = json.loads((tmp_path / "bench_data.json").read_text())
    have_dali = importlib.util.find_spec("nvidia.dali") is not None  # DALI rows exactly when it is installed
    assert {r["loader"] for r in records} == ({"torch", "dali"} if have_dali else {"torch"})
    assert all(r["images"] == 16 and r["images_per_s"] > 0 for r in records)
    table = (tmp_path / "bench_data.md").read_text()
    assert "images/s" in table and ("DALI rows skipped" in table) == (not have_dali)
    assert (tmp_path / "bench_data.png").stat().st_size > 1000


@pytest.mark.multiprocess
@pytest.mark.required
def test_bench_data_startup_rows_count_the_header_scans(tmp_path):
    """Start-up only, 10^4 records on 2 gloo ranks: before, every rank scans at the first start;
    after, rank 0 alone; the second start scans nowhere (the rows' scan counts, not their times)."""
    assert main(["bench", "data", "--out", str(tmp_path), "--startup-only", "--startup-records", "10000",
                 "--startup-ranks", "2", "--startup-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "bench_data_startup.json").read_text())
    assert [(r["mode"], r["start"], r["scans"], r["cache_after"]) for r in records] == [
        ("before", "first", 2, True), ("before", "second", 0, True),
        ("after", "first", 1, True), ("after", "second", 0, True)]
    assert all(r["records"] == 10000 and r["ranks"] == 2 and r["seconds"] > 0 for r in records)
    assert "header scans" in (tmp_path / "bench_data_startup.md").read_text()
    assert (tmp_path / "bench_data_startup.png").stat().st_size > 1000
    assert not (tmp_path / "bench_data.json").exists()  # --startup-only: no loader rows
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("startup-")] == []  # the index removed
