#!/usr/bin/env bash
# Check and benchmark one GPU in one command (about 8 minutes on one H100):
#   1. install carried wheels (GPU_WHEELS=dir: pip install --no-index --no-deps dir/*.whl);
#   2. the CUDA test tier (pytest -m cuda tests/cuda);
#   3. partialfc bench head --device cuda --dtype bf16 at 1e6, 4e6, 1.6e7 identities, rates 1
#      and 0.1, fused (torch, triton) and unfused, full softmax where it fits, and the class
#      capacity at the card's memory;
#   4. partialfc bench train: iresnet50, bf16, batch 128, full softmax vs Partial FC 0.1 at 1e6;
# writes JSON (naming the device), Markdown and PNG to GPU_CHECK_OUT (default
# benchmarks/results/gpu/), one log per step under its logs/, and prints a summary. A failed
# step is reported and the next one runs; the exit status is 1 if any step failed.
# DALI or DeepSpeed absent: their tests skip, with a line in the summary.
# GPU_CHECK_DRY=1: the same steps at tiny sizes on the CPU (what CI runs; under a minute).
# PYTHON: the interpreter (default .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT/logs"
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0

step() {  # step NAME COMMAND...: run, log, keep going
    local name=$1 log="$OUT/logs/$1.log" start=$SECONDS
    shift
    echo "== $name: $*"
    if "$@" >"$log" 2>&1; then
        SUMMARY+=("ok    $name ($((SECONDS - start)) s)")
    else
        SUMMARY+=("FAIL  $name ($((SECONDS - start)) s, exit $?): see $log")
        FAILED=1
    fi
    tail -n 3 "$log"
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [[ -n "${GPU_WHEELS:-}" ]]; then
    step wheels "$PY" -m pip install --no-index --no-deps "$GPU_WHEELS"/*.whl
fi
step environment "$PY" -c "import torch, partialfc
cuda = torch.cuda.is_available()
print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if cuda else 'no CUDA (CPU)')"

for module in nvidia.dali:DALI deepspeed:DeepSpeed triton:Triton; do
    if ! has "${module%%:*}"; then SUMMARY+=("skip  ${module##*:} not importable: its checks are skipped"); fi
done

if [[ "$DRY" == 1 ]]; then
    DEVICE=cpu DTYPE=fp32 BUDGET=1024
    HEAD=(--classes 2e3,4e3 --sample-rate 0.1 --methods partialfc --batch 32 --dim 16 --steps 1)
    TRAIN=(--classes 1000 --sample-rate 0.1 --methods partialfc --backbone iresnet_tiny --batch 8
           --dim 32 --steps 1 --warmup 1 --identities 40 --images-per-identity 2)
else
    DEVICE=cuda DTYPE=bf16
    BUDGET=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20)" 2>/dev/null || echo 81920)
    METHODS=full_softmax,partialfc,partialfc_unfused
    if has triton; then METHODS+=,partialfc_triton; fi
    HEAD=(--classes 1e6,4e6,1.6e7 --sample-rate 1.0,0.1 --methods "$METHODS" --batch 512 --dim 512 --steps 10)
    TRAIN=(--classes 1e6 --sample-rate 0.1 --methods full_softmax,partialfc --backbone iresnet50 --batch 128
           --dim 512 --steps 20 --warmup 5 --identities 1000 --images-per-identity 8)
fi

# the tier selects itself: without CUDA every test of it is skipped
step cuda_tier "$PY" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider
step bench_head "$PY" -m partialfc.cli bench head --device "$DEVICE" --dtype "$DTYPE" --budget-mb "$BUDGET" \
    --out "$OUT" --name head "${HEAD[@]}"
step bench_train "$PY" -m partialfc.cli bench train --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" --name train "${TRAIN[@]}"

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    grep -h "device:" "$OUT/logs/environment.log" 2>/dev/null
    echo
    printf -- '- %s\n' "${SUMMARY[@]}"
    for table in head train; do
        [[ -f "$OUT/$table.md" ]] && { echo; cat "$OUT/$table.md"; }
    done
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
