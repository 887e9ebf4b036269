"""launch/gpu_check.sh: its CPU dry path (GPU_CHECK_DRY=1: every step at tiny sizes, results
in GPU_CHECK_OUT, exit 0), its step handling (a failed step, a step past its time limit, a
run stopped half-way), and launch/gpu_wheels.sh's wheels for the GPU machine's Python 3.12."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "cuda_tier", "bench_head", "bench_train", "bench_blocking_wait", "bench_compile")


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GPU_WHEELS" and not k.startswith("GPU_CHECK_")}
    return dict(env, GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(tmp_path / "out"), **extra)


def _check(env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _fake_python(tmp_path: Path, slow: str) -> str:
    """A stand-in interpreter: every call succeeds at once, except the one whose arguments
    contain ``slow``: it writes its pid to ``slow.pid`` and sleeps a minute."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"{slow}"*) echo $$ > "{tmp_path}/slow.pid.tmp"; '
                    f'mv "{tmp_path}/slow.pid.tmp" "{tmp_path}/slow.pid"; exec sleep 60;; esac\nexit 0\n')
    fake.chmod(0o755)
    return str(fake)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_dead(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.multiprocess
def test_gpu_check_dry_run(tmp_path):
    done = _check(_env(tmp_path, PYTHON=sys.executable), timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    lines = [f"- ok    {step}" for step in STEPS]
    assert all(line in summary for line in lines), summary
    assert sorted(lines, key=summary.index) == lines  # in the order they ran
    for step in STEPS:
        assert f"ok    {step}" in done.stdout, step
    for name in ("head", "train"):
        records = json.loads((out / f"{name}.json").read_text())
        assert records and all(r["hardware"] for r in records if r.get("kind") != "capacity")
        assert (out / f"{name}.png").stat().st_size > 1000
    head = json.loads((out / "head.json").read_text())
    assert {r["memory_source"] for r in head if r.get("kind") != "capacity"} == {"tensor_accounting"}
    (fit,) = [r for r in head if r.get("kind") == "capacity"]
    assert fit["budget_mb"] == 1024 and fit["status"] == "ok" and fit["source"] == "tensor_accounting", fit
    assert fit["analytic_bytes_per_class"] == 2 * 16 * 4  # centre + momentum, fp32, dim 16
    assert 0.5 <= fit["bytes_per_class"] / fit["analytic_bytes_per_class"] <= 4, fit
    assert fit["max_classes"] > 0
    assert "no CUDA (CPU)" in summary and "| partialfc rate 0.1 | 1 |" in summary
    assert "samples/s with TORCH_NCCL_BLOCKING_WAIT=1" in summary and "without (the default): ratio " in summary
    assert "samples/s compiled" in summary and "eager: ratio " in summary
    compiled = json.loads((out / "train_compile.json").read_text())
    assert [(r["compiled"], r["status"]) for r in compiled] == [(False, "ok"), (True, "ok")]


def test_the_gpu_limits_fit_the_stated_budget():
    """The step limits on the GPU add up to no more than the 480 s (8 minutes) the header
    states, and its table gives each step's limit as the script sets it."""
    import re

    script = (REPO / "launch" / "gpu_check.sh").read_text()
    gpu = script[script.index("else\n    BUDGET_S=${GPU_CHECK_BUDGET_S:-480}"):]
    limits = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", gpu.split("\n")[2])}
    assert set(limits) == {"wheels", *STEPS} and sum(limits.values()) <= 480
    for name, limit in limits.items():
        assert re.search(rf"^#   {name} +{limit} +\d+ ", script, re.M), name
    assert re.search(rf"^#   total +{sum(limits.values())} ", script, re.M)


@pytest.mark.multiprocess
def test_a_failed_step_is_reported_and_the_rest_still_run(tmp_path):
    done = _check(_env(tmp_path, PYTHON="false"), timeout=60)
    assert done.returncode == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    for step in STEPS:
        assert f"FAIL  {step}" in done.stdout and f"- FAIL  {step}" in summary, step


@pytest.mark.multiprocess
def test_a_step_past_its_limit_is_a_timeout_and_the_next_step_runs(tmp_path):
    env = _env(tmp_path, PYTHON=_fake_python(tmp_path, "-m pytest"), GPU_CHECK_TIMEOUT_CUDA_TIER="1")
    done = _check(env, timeout=60)
    assert done.returncode == 1, done.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- TIMEOUT cuda_tier (limit 1 s)" in summary, summary
    for step in ("environment", "bench_head", "bench_train", "bench_blocking_wait", "bench_compile"):
        assert f"- ok    {step}" in summary, step
    assert _wait_dead(int((tmp_path / "slow.pid").read_text())), "the timed-out step's process still runs"


@pytest.mark.multiprocess
def test_the_budget_caps_every_step(tmp_path):
    env = _env(tmp_path, PYTHON=_fake_python(tmp_path, "-m pytest"), GPU_CHECK_BUDGET_S="2")
    done = _check(env, timeout=60)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 1 and "- ok    environment" in summary, summary
    assert "- TIMEOUT cuda_tier" in summary and "- SKIP  bench_head: nothing left of the 2 s budget" in summary


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_a_run_stopped_half_way_leaves_a_summary_of_the_steps_that_finished(tmp_path, sig):
    env = _env(tmp_path, PYTHON=_fake_python(tmp_path, "bench head"))
    with open(tmp_path / "stdout", "w") as stdout:
        proc = subprocess.Popen(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, stdout=stdout,
                                stderr=subprocess.STDOUT, start_new_session=True)
    pid_file, deadline = tmp_path / "slow.pid", time.monotonic() + 60
    while not pid_file.exists():  # bench_head has started: the steps before it have finished
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stdout").read_text()
        time.sleep(0.05)
    slow = int(pid_file.read_text())
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- ok    environment" in summary and "- ok    cuda_tier" in summary, summary
    assert "bench_train" not in summary
    if sig == signal.SIGTERM:  # the script stops its running step with it and says so
        assert proc.returncode == 2 and "- KILLED bench_head" in summary, summary
        assert _wait_dead(slow), "the stopped step's process still runs"
    else:  # no say for the script: the step runs on in its own process group until its limit
        assert "KILLED" not in summary
        os.kill(slow, signal.SIGKILL)


# -- launch/gpu_wheels.sh -----------------------------------------------------------------

TARGET = dict(python_version="3.12", python_full_version="3.12.0", implementation_name="cpython",
              platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
              platform_machine="x86_64", os_name="posix", extra="")
# what the GPU machine brings itself (gpu.md): its wheels' requirements need not be carried
GPU_OWN = {"torch", "numpy", "triton", "onnxruntime", "matplotlib", "pillow"}


def _supported_tags():
    """Every tag a CPython 3.12 on manylinux x86_64 (glibc up to 2.28) installs."""
    from packaging import tags

    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return (set(tags.cpython_tags((3, 12), ["cp312"], platforms))
            | set(tags.compatible_tags((3, 12), "cp312", platforms)))


def _requirements(wheel: Path) -> list[str]:
    """The wheel's requirements that apply on the target (no extras), canonical names."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = email.parser.Parser().parsestr(zf.read(meta).decode())
    reqs = [Requirement(r) for r in headers.get_all("Requires-Dist") or []]
    return [canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]


@pytest.fixture(scope="module")
def gpu_wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_wheels") / "wheels"
    done = subprocess.run(["bash", "launch/gpu_wheels.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.multiprocess
def test_gpu_wheels_are_for_cpython_312_manylinux_one_version_each(gpu_wheels):
    from packaging.utils import parse_wheel_filename

    supported = _supported_tags()
    sets = {"": sorted(gpu_wheels.glob("*.whl")), "fallback": sorted((gpu_wheels / "fallback").glob("*.whl"))}
    versions: dict[str, set] = {}
    for wheel in sets[""] + sets["fallback"]:
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        assert wheel_tags & supported, f"{wheel.name} does not install on CPython 3.12, manylinux x86_64"
        assert all(t.interpreter in ("py3", "cp312") or t.abi == "abi3" for t in wheel_tags), wheel.name
        versions.setdefault(name, set()).add(str(version))
    assert {n: v for n, v in versions.items() if len(v) > 1} == {}, "more than one version of a project"
    names = set(versions)
    assert {"partialfc", "omegaconf", "pyyaml", "tqdm", "rich", "markdown-it-py", "mdurl", "pygments",
            "safetensors"} <= names
    (own,) = [w for w in sets[""] if w.name.startswith("partialfc-")]
    assert own.name.endswith("-py3-none-any.whl")
    # omegaconf's antlr4 runtime: its own wheel, or the copy omegaconf 2.4 vendors
    (omegaconf,) = [w for w in sets[""] if w.name.startswith("omegaconf-")]
    vendored = "omegaconf/vendor/antlr4/__init__.py" in zipfile.ZipFile(omegaconf).namelist()
    assert vendored or "antlr4-python3-runtime" in names
    # nothing a carried wheel needs is missing (the fallback set may lean on the main one)
    main = {parse_wheel_filename(w.name)[0] for w in sets[""]}
    for group, wheels in sets.items():
        have = main | GPU_OWN | ({parse_wheel_filename(w.name)[0] for w in wheels})
        for wheel in wheels:
            assert set(_requirements(wheel)) <= have, (group, wheel.name, set(_requirements(wheel)) - have)
    assert sum(w.stat().st_size for w in gpu_wheels.rglob("*.whl")) < 8 * 2**20


def _python_312() -> str | None:
    """A CPython 3.12 with pip here, if any (the GPU machine's Python)."""
    candidates = [shutil.which("python3.12"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.multiprocess
def test_gpu_wheels_install_and_import_on_python_312(gpu_wheels, tmp_path):
    python = _python_312()
    if python is None:
        pytest.skip("no Python 3.12 with pip on this machine")
    site = tmp_path / "site"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                    str(site), *map(str, gpu_wheels.glob("*.whl"))], check=True, capture_output=True, timeout=120)
    code = ("import yaml, rich, tqdm, safetensors; from omegaconf import OmegaConf; "
            "assert OmegaConf.create({'a': '${b}', 'b': 3}).a == 3 and yaml.__with_libyaml__")
    done = subprocess.run([python, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
