#!/usr/bin/env bash
# Build the folder of wheels to carry to a bare GPU machine (its own Python 3.12 with torch,
# Triton, numpy, onnxruntime, and probably pytest, matplotlib and pillow; no package index):
# partialfc itself plus what it imports that such a machine lacks. There:
#   GPU_WHEELS=<folder> bash launch/gpu_check.sh
#   bash launch/gpu_wheels.sh [OUT_DIR]       (default dist/gpu_wheels; emptied first)
# The wheels are for the target, not for this machine: CPython PY_VERSION (default 3.12) on
# manylinux x86_64 (PLATFORMS, default every manylinux tag up to glibc 2.28), or pure Python.
# One pinned version of each project (the versions this project is tested with):
#   omegaconf 2.4 (carries its own antlr4 runtime in omegaconf/vendor: no antlr4-python3-runtime
#   wheel, whose 4.9.3 is an sdist only, is needed), PyYAML, tqdm, rich (+ markdown-it-py,
#   mdurl, pygments), safetensors, and partialfc as a py3-none-any wheel;
#   fallback/: pytest (+ pluggy, iniconfig, packaging, pytest-timeout), which gpu_check.sh
#   installs only where the machine has no pytest of its own.
# About 4 MB in all. Needs a package index here (pip download).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/gpu_wheels}
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PY_VERSION=${PY_VERSION:-3.12}
read -r -a PLATFORMS <<<"${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}"
DEPS=(omegaconf==2.4.0 PyYAML==6.0.4 tqdm==4.70.1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
      pygments==2.21.0 safetensors==0.8.0)
FALLBACK=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 pytest-timeout==2.4.0)

download() {  # DIR NAME==VERSION...: binary wheels for the target, no dependencies resolved
    local dir=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" -d "$dir" "$@"
}

# only what an earlier run of this script put there: OUT may be any folder the caller names
mkdir -p "$OUT/fallback"
rm -f "$OUT"/*.whl "$OUT"/fallback/*.whl
# partialfc from a copy of its sources (links to configs/ and slurm/ followed), so the build
# writes nothing into the clone
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -rL partialfc pyproject.toml README.md "$SRC/"
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
ISOLATION=()
"$PY" -c "import setuptools, wheel" 2>/dev/null && ISOLATION=(--no-build-isolation)
"$PY" -m pip wheel -q --no-deps "${ISOLATION[@]}" --wheel-dir "$OUT" "$SRC"
download "$OUT" "${DEPS[@]}"
download "$OUT/fallback" "${FALLBACK[@]}"
ls -1sh "$OUT" "$OUT/fallback"
