#!/usr/bin/env bash
# Train with DeepSpeed's launcher (config: train.engine=deepspeed). Multi-node: a hostfile
# with lines "host slots=GPUS" and passwordless ssh between the hosts.
#   bash launch/deepspeed.sh CONFIG [key=value ...]
#   HOSTFILE=hosts.txt bash launch/deepspeed.sh CONFIG [key=value ...]
# Runs in the caller's directory, so relative paths (CONFIG, data.rec=...) mean what they say there.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: bash launch/deepspeed.sh CONFIG [key=value ...]" >&2; exit 2; }
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
elif [ -n "${NPROC:-}" ]; then
  args+=(--num_gpus "$NPROC")
fi
exec "$REPO/.venv/bin/deepspeed" "${args[@]}" --no_local_rank --module partialfc.cli train "$@"
