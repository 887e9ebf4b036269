"""``partialfc bench data`` writes its JSON, Markdown table and PNG."""

from __future__ import annotations

import importlib.util
import json

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
