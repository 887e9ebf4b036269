#!/usr/bin/env bash
# Train on one machine with torchrun: one rank per GPU (or per CPU process with --cpu N).
#   bash launch/torchrun.sh CONFIG [key=value ...]            # all visible GPUs
#   NPROC=4 bash launch/torchrun.sh CONFIG [key=value ...]    # 4 ranks
# Runs in the caller's directory, so relative paths (CONFIG, data.rec=...) mean what they say there.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: bash launch/torchrun.sh CONFIG [key=value ...]" >&2; exit 2; }
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$REPO/.venv/bin/python" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec "$REPO/.venv/bin/python" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
  -m partialfc.cli train "$@"
