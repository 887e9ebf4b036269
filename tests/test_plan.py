"""partialfc plan: the head estimate against a measured CPU step, the class state against the
formula, the CLI, and submit's pre-check."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from partialfc import PartialFC, SparseRowSGD
from partialfc.bench.capacity import MemoryMeter
from partialfc.cli import main
from partialfc.plan import head_bytes, plan


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("rate", [0.1, 1.0])
def test_head_estimate_within_10_percent_of_measured_peak(storage, rate):
    classes, dim, batch = 20000, 64, 32
    torch.manual_seed(0)
    x, y = torch.randn(batch, dim, requires_grad=True), torch.randint(0, classes, (batch,))
    meter = MemoryMeter(torch.device("cpu"))
    with meter.counting(x, y):
        head = PartialFC(dim, classes, sample_rate=rate, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[storage])
        opt = SparseRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        meter.steps_start()
        for _ in range(2):  # the optimizer state exists after the first
            opt.zero_grad(set_to_none=True)
            head(x, y).backward()
            opt.step()
    assert head.fused == "torch"  # the path the plan counts
    h = head_bytes(classes, 1, dim, batch, rate, storage, "sgd", compute=storage)
    estimate = h["centres"] + h["optimizer"] + h["working"]
    assert abs(estimate / meter.peak_bytes() - 1) < 0.10, (estimate, meter.peak_bytes())


def test_class_state_at_1e8_identities_on_64_gpus_is_the_formula():
    result = plan(10**8, 8, 8, 80, rates=(0.1, 0.3), dtypes=("fp32", "bf16"), activation_gb=0)
    for r in result["rows"]:
        itemsize = {"fp32": 4, "bf16": 2}[r["dtype"]]
        assert r["centres_gb"] * 1e9 == 10**8 / 64 * 512 * itemsize
        assert r["optimizer_gb"] * 1e9 == 10**8 / 64 * 512 * itemsize  # one momentum row per class
    adamw = plan(10**8, 8, 8, 80, dtypes=("fp32",), optimizer="adamw", activation_gb=0)["rows"][0]
    assert adamw["optimizer_gb"] * 1e9 == 10**8 / 64 * 512 * 4 * 2  # exp_avg and exp_avg_sq
    assert result["recommended"]["rate"] == 0.1


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--identities", "1e8", "--gpus-per-node", "8", "--nodes", "8", "--backbone", "iresnet18",
                 "--rates", "0.1,0.3", "--dtypes", "fp32,bf16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max identities" in text and "recommended: head.sample_rate=0.1" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and all(r["fits"] for r in data["rows"])


@pytest.mark.parametrize("args, message", [
    (["--identities", "-5"], "error: identities must be >= 1, got -5"),
    (["--identities", "100", "--rates", "1.5"], "error: sample rate 1.5 outside (0, 1]"),
    (["--identities", "100", "--rates", "0"], "error: sample rate 0.0 outside (0, 1]"),
])
def test_cli_bad_input_is_one_error_line(args, message, capsys):
    assert main(["plan", *args, "--activation-gb", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [message]


def _config(tmp_path, classes: int):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"base": "demo.yaml", "data": {"num_classes": classes},
                                    "model": {"backbone": "iresnet18"}}))
    return path


@pytest.fixture
def demo_base(tmp_path):
    from partialfc.resources import resolve_config

    (tmp_path / "demo.yaml").write_text(open(resolve_config("demo")).read())


def test_submit_refuses_a_job_that_cannot_fit(tmp_path, demo_base, capsys):
    config = _config(tmp_path, 10**10)
    code = main(["submit", str(config), "--gpus-per-node", "8", "--nodes", "1", "--gpu-memory-gb", "80",
                 "--run-dir", str(tmp_path / "run"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: 10000000000 identities on 8 GPUs needs ") and "at sample rate" in err[0]
    assert "the GPU has 80 GB" in err[0] and "try " in err[0]


def test_submit_accepts_a_job_that_fits(tmp_path, demo_base, capsys):
    config = _config(tmp_path, 10**6)
    assert main(["submit", str(config), "--gpus-per-node", "8", "--nodes", "1", "--gpu-memory-gb", "80",
                 "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
