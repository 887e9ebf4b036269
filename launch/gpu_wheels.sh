#!/usr/bin/env bash
# Build the folder of wheels to carry to a bare GPU machine (torch, numpy and Triton already
# there, no package index): partialfc itself plus the dependencies it imports that such a
# machine lacks. There: GPU_WHEELS=<folder> bash launch/gpu_check.sh
#   bash launch/gpu_wheels.sh [OUT_DIR]       (default dist/gpu_wheels)
# PY_VERSION (e.g. 3.12) and PLATFORM (default manylinux2014_x86_64) select the target's
# binary wheels when it runs another Python than this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/gpu_wheels}
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PY_VERSION=${PY_VERSION:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
# module-level imports of the head, bench and trainer paths, and pytest for the CUDA tier
# (docs/benchmarks.md, "GPU"); antlr4-python3-runtime 4.9.3 (omegaconf's) is an sdist only:
# built into a pure-Python wheel here
DEPS=(omegaconf PyYAML tqdm rich markdown-it-py mdurl pygments
      matplotlib contourpy cycler fonttools kiwisolver packaging pyparsing python-dateutil six
      pillow psutil pytest pluggy iniconfig pytest-timeout)
mkdir -p "$OUT"
"$PY" -m pip wheel --no-deps --wheel-dir "$OUT" . "antlr4-python3-runtime==4.9.3"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --platform "$PLATFORM" \
    --dest "$OUT" "${DEPS[@]}"
ls -1 "$OUT"
