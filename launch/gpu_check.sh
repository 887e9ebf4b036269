#!/usr/bin/env bash
# Check and benchmark one GPU in one command, within 8 minutes (480 s) on one H100 or H200.
# Every step runs under its own time limit (coreutils timeout, its whole process group);
# the limits add up to the budget, and no step starts with more time than is left of it:
#
#   step          limit s  expected s  what
#   wheels             20          5   the carried wheels (GPU_WHEELS=dir) into GPU_SITE, on PYTHONPATH
#   environment        20          8   torch, partialfc and the device's name
#   cuda_tier         150        120   pytest -m cuda tests/cuda
#   bench_head         90         70   bench head, bf16, 1e6 and 1e7 identities, rates 1 and 0.1: full softmax,
#                                      partialfc (fused torch chunks), partialfc_unfused, partialfc_triton when
#                                      Triton imports; capacity at the card's memory; all in one process
#   bench_train        70         60   bench train: iresnet50, bf16, batch 128, full softmax vs Partial FC 0.1 at 1e6
#   bench_blocking_wait 30        25   the same Partial FC run with TORCH_NCCL_BLOCKING_WAIT=1 (partialfc's
#                                      default leaves it unset): samples/s as a ratio to bench_train's
#   bench_compile      90         70   the Partial FC run eager and with the backbone under torch.compile
#                                      (bench train --compile, fewer steps): compiled / eager samples/s
#   total             470        358
#
# The expected seconds are estimates (no GPU has run this yet); summary.md gives the real ones.
# summary.md (in GPU_CHECK_OUT) is appended as each step ends, so a run cut short still
# lists the steps that finished; TERM, INT or HUP stop the running step and note it there.
# A failed or timed-out step is reported and the next one runs; exit 1 if any failed.
# Results: JSON (naming the device), Markdown and PNG in GPU_CHECK_OUT (default
# benchmarks/results/gpu/), one log per step under its logs/.
# DALI, DeepSpeed or Triton absent: their tests skip, with a line in the summary.
#
# Environment: PYTHON (default .venv/bin/python when present, else python3); GPU_WHEELS (a
# folder from launch/gpu_wheels.sh); GPU_SITE (where they go, default $TMPDIR/partialfc_site:
# pip --target, never the interpreter's own site-packages); GPU_CHECK_BUDGET_S (default 480);
# GPU_CHECK_TIMEOUT_<STEP> (e.g. GPU_CHECK_TIMEOUT_CUDA_TIER=200) a step's limit in seconds;
# GPU_CHECK_DRY=1: the same steps at tiny sizes on the CPU (what CI runs; under a minute on an
# idle machine), each step limited to 600 s and the run to 3000 s instead.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
DRY=${GPU_CHECK_DRY:-0}
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/partialfc_site}
if [[ "$DRY" == 1 ]]; then  # the CPU path checks the script, not a budget: a loaded CI machine is slow
    BUDGET_S=${GPU_CHECK_BUDGET_S:-3000}
    declare -A LIMITS=([wheels]=600 [environment]=600 [cuda_tier]=600 [bench_head]=600 [bench_train]=600
                       [bench_blocking_wait]=600 [bench_compile]=600)
else
    BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
    declare -A LIMITS=([wheels]=20 [environment]=20 [cuda_tier]=150 [bench_head]=90 [bench_train]=70 [bench_blocking_wait]=30 [bench_compile]=90)
fi
SUMMARY="$OUT/summary.md"
mkdir -p "$OUT/logs"
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
FAILED=0 CHILD="" CURRENT="" CURRENT_START=0

note() {  # a line of the summary, written at once
    echo "$*"
    echo "- $*" >>"$SUMMARY"
}

interrupted() {  # the run is being stopped: stop the running step's process group, say so
    trap - TERM INT HUP
    if [[ -n "$CHILD" ]]; then
        kill -TERM "$CHILD" 2>/dev/null  # timeout passes it on to its group, KILL 10 s later
        wait "$CHILD" 2>/dev/null
        note "KILLED $CURRENT ($((SECONDS - CURRENT_START)) s, SIG$1): the run was stopped; the steps after it did not run"
    else
        note "KILLED between steps (SIG$1): the steps after this did not run"
    fi
    exit 2
}
trap 'interrupted TERM' TERM
trap 'interrupted INT' INT
trap 'interrupted HUP' HUP

step() {  # step NAME COMMAND...: run under its time limit, log, note the outcome, keep going
    local name=$1 log="$OUT/logs/$1.log" var limit left rc elapsed
    shift
    var="GPU_CHECK_TIMEOUT_${name^^}"
    limit=${!var:-${LIMITS[$name]}}
    left=$((BUDGET_S - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 1)); then
        note "SKIP  $name: nothing left of the ${BUDGET_S} s budget"
        FAILED=1
        return
    fi
    echo "== $name (limit $limit s): $*"
    CURRENT=$name CURRENT_START=$SECONDS
    # in the background, so that a signal to this script is handled at once, not after the step
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD=""
    elapsed=$((SECONDS - CURRENT_START))
    if ((rc == 0)); then
        note "ok    $name ($elapsed s)"
    elif ((rc == 124 || (rc == 137 && elapsed >= limit))); then
        note "TIMEOUT $name (limit $limit s): see $log"
        FAILED=1
    else
        note "FAIL  $name ($elapsed s, exit $rc): see $log"
        FAILED=1
    fi
    tail -n 3 "$log"
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

install_wheels() {  # PY DIR SITE: DIR/*.whl into SITE, no index, no dependencies resolved
    mkdir -p "$3"
    if "$1" -m pip --version >/dev/null 2>&1; then
        "$1" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$3" "$2"/*.whl
    else  # no pip on this interpreter: a wheel is a zip laid out as site-packages
        "$1" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$3" "$2"/*.whl
    fi
}
export -f install_wheels

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Budget ${BUDGET_S} s; one line per step as it ends."
    echo
} >"$SUMMARY"

if [[ -n "${GPU_WHEELS:-}" ]]; then
    # pytest and its plugins only where the machine has no pytest of its own
    WHEELS=("$GPU_WHEELS")
    has pytest || [[ ! -d "$GPU_WHEELS/fallback" ]] || WHEELS+=("$GPU_WHEELS/fallback")
    step wheels bash -c 'for d in "${@:3}"; do install_wheels "$1" "$d" "$2" || exit; done' _ "$PY" "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
step environment "$PY" -c "import torch, partialfc
cuda = torch.cuda.is_available()
print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if cuda else 'no CUDA (CPU)')"
grep -h "device:" "$OUT/logs/environment.log" 2>/dev/null | sed 's/^/- /' >>"$SUMMARY"

for module in nvidia.dali:DALI deepspeed:DeepSpeed triton:Triton; do
    has "${module%%:*}" || note "skip  ${module##*:} not importable: its checks are skipped"
done

if [[ "$DRY" == 1 ]]; then
    DEVICE=cpu DTYPE=fp32 BUDGET_MB=1024
    HEAD=(--classes 2e3,4e3 --sample-rate 0.1 --methods partialfc --batch 32 --dim 16 --steps 1)
    TRAIN=(--classes 1000 --sample-rate 0.1 --methods partialfc --backbone iresnet_tiny --batch 8
           --dim 32 --steps 1 --warmup 1 --identities 40 --images-per-identity 2)
    COMPILE_STEPS=1
else
    DEVICE=cuda DTYPE=bf16
    BUDGET_MB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20)" 2>/dev/null || echo 81920)
    METHODS=full_softmax,partialfc,partialfc_unfused
    if has triton; then METHODS+=,partialfc_triton; fi
    HEAD=(--classes 1e6,1e7 --sample-rate 1.0,0.1 --methods "$METHODS" --batch 512 --dim 512 --steps 10)
    TRAIN=(--classes 1e6 --sample-rate 0.1 --methods full_softmax,partialfc --backbone iresnet50 --batch 128
           --dim 512 --steps 20 --warmup 5 --identities 1000 --images-per-identity 8)
    COMPILE_STEPS=10
fi

table() {  # the bench's table into the summary, when this run wrote one
    [[ -f "$OUT/$1.md" ]] && { echo; cat "$OUT/$1.md"; echo; } >>"$SUMMARY"
}

# the tier selects itself: without CUDA every test of it is skipped
step cuda_tier "$PY" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider
rm -f "$OUT"/head.{json,md,png}
step bench_head "$PY" -m partialfc.cli bench head --device "$DEVICE" --dtype "$DTYPE" --budget-mb "$BUDGET_MB" \
    --out "$OUT" --name head "${HEAD[@]}"
table head
rm -f "$OUT"/train.{json,md,png}
step bench_train "$PY" -m partialfc.cli bench train --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" --name train "${TRAIN[@]}"
table train
# the NCCL setting partialfc no longer makes: a host busy-wait in every synchronous collective
rm -f "$OUT"/train_blocking_wait.{json,md,png}
step bench_blocking_wait env TORCH_NCCL_BLOCKING_WAIT=1 "$PY" -m partialfc.cli bench train --device "$DEVICE" \
    --dtype "$DTYPE" --out "$OUT" --name train_blocking_wait "${TRAIN[@]}" --methods partialfc
"$PY" - "$OUT" >>"$SUMMARY" 2>/dev/null <<'RATIO'
import json, sys
rate = {}
for name in ("train", "train_blocking_wait"):
    rate[name] = next(r["samples_per_s"] for r in json.load(open(f"{sys.argv[1]}/{name}.json"))
                      if r.get("method") == "partialfc" and "samples_per_s" in r)
print(f"- bench train, Partial FC: {rate['train_blocking_wait']:.1f} samples/s with TORCH_NCCL_BLOCKING_WAIT=1, "
      f"{rate['train']:.1f} without (the default): ratio {rate['train'] / rate['train_blocking_wait']:.3f}")
RATIO
# train.compile is off until this ratio says otherwise: eager and compiled side by side, one run
rm -f "$OUT"/train_compile.{json,md,png}
step bench_compile "$PY" -m partialfc.cli bench train --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" \
    --name train_compile "${TRAIN[@]}" --methods partialfc --steps "$COMPILE_STEPS" --compile
table train_compile
"$PY" - "$OUT" >>"$SUMMARY" 2>/dev/null <<'RATIO'
import json, sys
rate = {r["compiled"]: r["samples_per_s"] for r in json.load(open(f"{sys.argv[1]}/train_compile.json"))
        if r.get("method") == "partialfc" and "samples_per_s" in r}
print(f"- bench train --compile, Partial FC: {rate[True]:.1f} samples/s compiled, {rate[False]:.1f} eager: "
      f"ratio {rate[True] / rate[False]:.3f}")
RATIO

echo
cat "$SUMMARY"
exit $FAILED
