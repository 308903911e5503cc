#!/usr/bin/env bash
# GPU configurations of the benchmarks, in one go (~4-8 min on one H100/H200-class GPU).
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default: benchmarks/results/gpu
#
# Runs, each under its own time limit so one slow part cannot starve the rest:
#   1. the bare RCO step against Adam (N=10000, K=8)             step_breakdown.json
#   2. the knapsack DP, N up to 10000, K=8, B=10000               knapsack_dp.json
#   3. the multiple-budget retraction (q=16, N=500, K=32, ...)    multibudget_quick.json
#   4. the Birkhoff projection against Sinkhorn                   birkhoff.json / .png
#   5. RCO steps per second of the quantization search on a SmolLM2-135M-shaped model with
#      random weights (no model file or network needed)           quant_steps.json
#   6. sweep throughput, 64 runs, on the default backend vs one CPU device   scaling.json
# Needs a JAX with GPU support (on a machine without network, carry the repository and use
# the installed jax: PYTHONPATH=. is set below). Prints which device JAX sees; on CPU it
# still runs, which is how this script is tested, but the numbers are then CPU numbers.
# If $OUT is set (the device tool), a tarball of the results is left there too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
export RCO_BENCH_RESULTS="$OUT_DIR" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu.log"
: > "$LOG"

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

run() {  # run LIMIT_SECONDS NAME ARGS...: one benchmark, its output appended to the log
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$PY" "$@" 2>&1 | grep -v "^\s*$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

run 60  step        benchmarks/step_breakdown.py
run 90  knapsack    benchmarks/knapsack.py --quick --parts dp
run 90  multibudget benchmarks/multibudget.py --quick
run 150 birkhoff    benchmarks/birkhoff.py --plot "$OUT_DIR/birkhoff.png"
run 90  quant_steps benchmarks/quant_steps.py --steps 40 --batch 8 --seq 256
run 120 scaling     benchmarks/scaling.py --devices 1 --accelerator

echo "results in $OUT_DIR:" && ls "$OUT_DIR"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  tar czf "$OUT/gpu_results.tar.gz" -C "$OUT_DIR" . && cp "$LOG" "$OUT/"
fi
