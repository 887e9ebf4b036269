"""``partialfc bench data`` writes its JSON, Markdown table and PNG."""

from __future__ import annotations

import json

from partialfc.cli import main


def test_bench_data_writes_outputs(tmp_path):
    assert main(["bench", "data", "--out", str(tmp_path), "--identities", "4", "--images-per-identity", "8",
                 "--batch", "8", "--batches", "2", "--warmup", "1", "--workers", "0", "--dali-threads", "1"]) == 0
    records = json.loads((tmp_path / "bench_data.json").read_text())
    assert {r["loader"] for r in records} >= {"torch"}
    assert all(r["images"] == 16 and r["images_per_s"] > 0 for r in records)
    assert "images/s" in (tmp_path / "bench_data.md").read_text()
    assert (tmp_path / "bench_data.png").stat().st_size > 1000
