#!/usr/bin/env bash
# Set up the environment and run the whole test suite. Extra arguments go to pytest.
# With CI=true (or PARTIALFC_STRICT=1) a skipped test marked `required` is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true ORT_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -ra "$@"
