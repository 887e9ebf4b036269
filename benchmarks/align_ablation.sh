#!/usr/bin/env bash
# Is five-point alignment worth it? The photos recipe trained on the same identities and judged
# on the same held-out pairs: on the faces data prepare aligns, and on the whole photos resized to
# 112x112 (what data pack of raw photos gives); three training seeds each. Prints each run's
# last held-out accuracy.
#   bash benchmarks/align_ablation.sh [PHOTOS] [WORK]    (default: ../shared/data/celeba_wild)
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-../shared/data/celeba_wild}
work=${2:-runs/align_ablation}
bash launch/setup.sh
py=.venv/bin/python
$py -m partialfc.cli data prepare "$photos" "$work/aligned_set" --val-identities 10 --pairs 600 --no-progress
$py benchmarks/scripts/unaligned_twin.py "$photos" "$work/aligned_set" "$work/unaligned_set"
for seed in 0 1 2; do
  for kind in aligned unaligned; do
    $py -m partialfc.cli train photos data.rec="$work/${kind}_set/train" "eval.bins=[$work/${kind}_set/val.bin]" \
      run_dir="$work/run_${kind}_$seed" seed=$seed checkpoint.resume=none checkpoint.overwrite=true \
      | tail -1 | sed "s/^/$kind seed $seed: /"
  done
done
