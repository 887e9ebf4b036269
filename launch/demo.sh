#!/usr/bin/env bash
# Set up the environment and run the main job on its embedded default: train on a
# synthetic identity dataset generated on first use (configs/demo.yaml), evaluate on
# held-out identities and print `accuracy: 0.xxx`. Output: runs/demo/ (checkpoints,
# metrics.jsonl, curves.png, offline wandb run). Extra arguments are config overrides.
# Installs only what the demo uses (extra `wandb`) unless PARTIALFC_EXTRAS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTIALFC_EXTRAS=${PARTIALFC_EXTRAS:-wandb} bash launch/setup.sh
exec .venv/bin/partialfc train configs/demo.yaml "$@"
