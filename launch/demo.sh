#!/usr/bin/env bash
# Set up the environment and run the main job on its embedded default.
# Until the trainer lands this is the head benchmark: Partial FC (rate 1 and 0.1) against a
# plain full softmax, written to benchmarks/results/demo/ (JSON, Markdown table, PNG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/partialfc bench head --classes 1e4,1e5,3e5 --sample-rate 1.0,0.1 --batch 256 --dim 512 \
  --steps 3 --out benchmarks/results/demo --name demo "$@"
