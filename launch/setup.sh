#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install partialfc with
# the extras its tests use. torch 2.13.0 goes in first: on a machine without CUDA that is
# the CPU wheel; afterwards the project's torch range is already satisfied.
# Re-running is cheap: installs happen again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${PARTIALFC_EXTRAS:-dev,dali,deepspeed,wandb,onnx,align}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.partialfc-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
  case ",$EXTRAS," in *,align,*)  # MTCNN's weights; the package's own pins are stale (pyproject.toml)
    .venv/bin/python -m pip install --quiet --no-deps "facenet-pytorch>=2.5.3" ;; esac
  echo "$want" > "$stamp"
fi
