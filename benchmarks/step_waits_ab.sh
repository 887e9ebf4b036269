#!/usr/bin/env bash
# Issue 26's step before and after, side by side in one script on one machine:
#   git worktree add /tmp/before d2db8a6^   # the parent of the first commit
#   bash benchmarks/step_waits_ab.sh        # from the repository root
# Alternates before / after twice; results in benchmarks/results/train/step_waits/.
set -euo pipefail
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
BEFORE=${BEFORE:-/tmp/before}
ARGS=(bench train --classes 100000 --sample-rate 1.0,0.1 --methods partialfc --nproc 2 --batch 64 --dim 128
      --steps 30 --warmup 3 --backbone iresnet_tiny --identities 200 --images-per-identity 8
      --out "$ROOT/benchmarks/results/train/step_waits")
for round in 1 2; do
    for side in before after; do
        dir=$BEFORE
        [[ $side == after ]] && dir=$ROOT
        (cd "$dir" && "$PY" -m partialfc.cli "${ARGS[@]}" --name "${side}_r$round" >/dev/null)
        echo "$side, round $round: done"
    done
done
