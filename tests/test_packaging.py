"""A plain install outside the clone: build the wheel, install it into a fresh virtual
environment (torch 2.13.0 first, then the wheel with its dependencies) and run the packaged
demo config and the packaged Slurm templates from a directory that is not the clone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import partialfc

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multiprocess, pytest.mark.required]


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _tracked_copy(dest: Path) -> Path:
    """The clone's files that git does not ignore (links kept as links), so the build never
    touches the clone."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif source.exists():  # deleted but not yet committed
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` directory of a fresh venv with the wheel installed."""
    root = tmp_path_factory.mktemp("packaging")
    source = _tracked_copy(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
          source], cwd=root)
    wheel = next((root / "dist").glob("partialfc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "partialfc/configs/demo.yaml" in names and "partialfc/configs/base/ms1mv3_r50.yaml" in names
    assert {"partialfc/slurm/task_per_gpu.sbatch", "partialfc/slurm/preemptible.sh"} <= set(names)
    _run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0"], cwd=root, timeout=600)
    _run([python, "-m", "pip", "install", "-q", "--no-compile", wheel], cwd=root, timeout=600)
    return python.parent


def test_version(installed, tmp_path):
    done = _run([installed / "partialfc", "--version"], cwd=tmp_path)
    assert done.stdout.strip() == f"partialfc {partialfc.__version__}"


def test_packaged_demo_trains(installed, tmp_path):
    run_dir = tmp_path / "run"
    done = _run([installed / "partialfc", "train", "demo", "train.max_steps=2", "log.wandb.mode=disabled",
                 "eval.at_start=false", "data.synthetic.num_identities=40", "data.synthetic.verification_identities=10",
                 "data.synthetic.verification_pairs=40", f"run_dir={run_dir}"], cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2
    assert any(r["kind"] == "eval" and 0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert (tmp_path / "runs" / "data").is_dir()  # the demo's cache_dir is relative to where it ran
    summary = "data synthetic (40 identities): 40 classes, 480 images, torch loader"
    assert summary in done.stdout and summary in (run_dir / "training.log").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)


def test_packaged_templates_submit(installed, tmp_path):
    done = _run([installed / "partialfc", "submit", "demo", "--dry-run", "--tasks-per-node", "2"], cwd=tmp_path)
    script = done.stdout
    site = Path(_run([installed / "python", "-c", "import partialfc, os; print(os.path.dirname(partialfc.__file__))"],
                     cwd=tmp_path).stdout.strip())
    assert script.startswith("#!") and "#SBATCH --ntasks-per-node=2" in script
    assert f"{site}/slurm/preemptible.sh" in script and f"{site}/configs/demo.yaml" in script
    assert f"run_dir={tmp_path}/runs/demo" in script


def test_unknown_config_name(installed, tmp_path):
    done = subprocess.run([str(installed / "partialfc"), "train", "nonexistent"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "packaged: " in done.stderr and "demo" in done.stderr
