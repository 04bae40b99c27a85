#!/usr/bin/env bash
# The one GPU run: versions, GPU tests, quick tuner, benchmark, Llama training
# benchmark -- in under 9 minutes, results in $OUT. From the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#   && bash benchmarks/gpu_suite.sh
#
# Environment knobs:
#   OUT=dir               where results go (default benchmarks/results/gpu_suite)
#   BENCH_FULL=1          full benchmark sweep instead of --quick; runs the
#                         benchmark alone (no tests/tuner/llama) to fit the time
#   BENCH_ARGS="..."      extra benchmark flags, e.g. "--zigzag 16x131072 --workloads zigzag"
#                         or "--budget-s 180" (the last --budget-s given wins)
#   BENCH_MAX_S=200       the benchmark step's limit (--quick); a budget's headline pairs
#                         may run to 1.25x the budget, so give it room
#   TUNE_ARGS="..."       extra tuner flags, e.g. "--backends triton --head-dims 128"
#   SUITE_TESTS=gpu|all|none   which pytest selection runs (default gpu: -m gpu)
#   SUITE_SECONDS=510     overall deadline; every step gets what is left of it
#   USE_FRESH_TABLE=0     benchmark with the package's table instead of the one just tuned
#   SUITE_LLAMA=0         skip the Llama training benchmark
#
# $OUT ends with at most 8 files, none in sub-folders: suite.log (everything),
# gpu_tests.log, bench.md, bench.json, bench_grouped_vs_baselines.png,
# tuned_<gpu>.json, llama.log and extra.tar.gz (other plots, raw outputs).

set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

OUT="${OUT:-benchmarks/results/gpu_suite}"
WORK="$OUT/work"
SUITE_SECONDS="${SUITE_SECONDS:-510}"
START=$(date +%s)
mkdir -p "$WORK"

remaining() { echo $(( SUITE_SECONDS - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: runs CMD under `timeout` with min(MAX, time left - 15 s).
step() {
  local name=$1 max=$2; shift 2
  local left; left=$(( $(remaining) - 15 ))
  local limit=$(( max < left ? max : left ))
  if (( limit < 20 )); then
    echo "=== $name: SKIPPED (suite deadline: ${left}s left) ==="
    return 0
  fi
  echo
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s into the suite) ==="
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then
    echo "=== $name: TIMED OUT after ${took}s ==="
  else
    echo "=== $name: exit $rc after ${took}s ==="
  fi
  return 0
}

budget_for() {  # seconds a self-limiting program may plan for, given its step limit
  local max=$1 left; left=$(( $(remaining) - 15 ))
  local limit=$(( max < left ? max : left ))
  echo $(( limit > 90 ? limit - 45 : limit / 2 ))
}

versions() {
  echo "date: $(date -u)"; uname -a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
  nvidia-smi topo -m 2>/dev/null | head -5 || true
  python3 - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for p in ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "triton",
          "jax-triton", "flax", "optax", "matplotlib", "tqdm", "pytest", "numpy"]:
  try:
    print(f"  {p} {md.version(p)}")
  except md.PackageNotFoundError:
    pass
import jax
print("devices:", jax.devices(), "| backend:", jax.default_backend())
print("device_kind:", jax.devices()[0].device_kind)
try:
  import jax_triton  # noqa: F401
  print("jax_triton imports: ok")
except Exception as e:  # noqa: BLE001
  print("jax_triton import FAILED:", type(e).__name__, e)
EOF
}

tests() {
  local sel=${SUITE_TESTS:-gpu}
  case "$sel" in
    none) echo "tests skipped (SUITE_TESTS=none)";;
    all) python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/gpu_tests.log";;
    *) # Six workers compile kernels in parallel; no preallocation so they share the GPU.
       XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -p no:cacheprovider -rs -n 6 \
           -W ignore::DeprecationWarning -m "gpu and not big" tests 2>&1 | tee "$OUT/gpu_tests.log"
       local rc=$?
       echo "--- big GPU tests (T >= 8192, > 2^31 elements), one at a time" | tee -a "$OUT/gpu_tests.log"
       python3 -m pytest -q -p no:cacheprovider -rs -W ignore::DeprecationWarning -m "gpu and big" \
           tests 2>&1 | tee -a "$OUT/gpu_tests.log"
       [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
       echo "--- the benchmark's and tuning table's own CPU-checkable tests" | tee -a "$OUT/gpu_tests.log"
       python3 -m pytest -q -p no:cacheprovider -rs -m "not gpu" tests/test_tuning.py \
           tests/test_bench_smoke.py 2>&1 | tee -a "$OUT/gpu_tests.log"
       return $rc;;
  esac
}

llama() {
  if [[ ! -f benchmarks/llama.py ]]; then
    echo "benchmarks/llama.py not present: skipped" | tee "$OUT/llama.log"
    return 0
  fi
  local help; help=$(python3 benchmarks/llama.py --help 2>&1)
  {
    if grep -q -- "--preset" <<<"$help" && grep -q -- "--steps" <<<"$help"; then
      local backends="triton"
      grep -q "jax-cudnn" <<<"$help" && backends="triton jax-cudnn"
      for b in $backends; do
        echo "--- llama.py --backend $b --preset small --seq 4096 --steps 10 --warmup 2"
        timeout -k 5 "$(( $(budget_for 80) / 2 + 20 ))" \
            python3 benchmarks/llama.py --backend "$b" --preset small --seq 4096 --steps 10 --warmup 2
        echo "--- exit $?"
      done
    else
      echo "llama.py flags changed (no --preset/--steps); running its defaults"
      echo "$help" | head -30
      python3 benchmarks/llama.py
    fi
  } 2>&1 | tee "$OUT/llama.log"
}

collect() {
  echo
  echo "=== collect ($(( $(date +%s) - START ))s) ==="
  for f in bench.md bench.json bench_grouped_vs_baselines.png; do
    [[ -f "$WORK/bench/$f" ]] && cp "$WORK/bench/$f" "$OUT/$f"
  done
  local t
  for t in "$WORK"/tuned/*.json; do
    [[ -f "$t" ]] && cp "$t" "$OUT/tuned_$(basename "$t")" && break
  done
  tar -czf "$OUT/extra.tar.gz" -C "$WORK" . 2>/dev/null && rm -rf "$WORK"
  ls -la "$OUT"
}

export OUT WORK START SUITE_SECONDS
export -f remaining budget_for versions tests llama

main() {
  echo "gpu_suite: OUT=$OUT deadline ${SUITE_SECONDS}s, BENCH_FULL=${BENCH_FULL:-0}"
  step versions 60 bash -c versions
  local bench_mode="--quick"
  if [[ "${BENCH_FULL:-0}" == "1" ]]; then
    bench_mode=""
    echo "BENCH_FULL=1: full benchmark only (tests, tuner and llama skipped to fit the time)"
  else
    step "gpu tests" 200 bash -c tests
    step "tuner --quick" 120 python3 -m benchmarks.tune --quick --out "$WORK/tuned" \
        --budget-s "$(budget_for 120)" ${TUNE_ARGS:-}
  fi
  local fresh=""
  if [[ "${USE_FRESH_TABLE:-1}" == "1" ]] && ls "$WORK"/tuned/*.json >/dev/null 2>&1; then
    fresh="$WORK/tuned"
    echo "benchmark uses the table just tuned: $(ls "$WORK"/tuned/*.json)"
  fi
  local bmax=${BENCH_MAX_S:-200}
  [[ -z "$bench_mode" ]] && bmax=520
  step "benchmark ${bench_mode:-full}" "$bmax" env ${fresh:+JAX_GROUPED_ATTN_TUNED_DIR="$fresh"} \
      python3 -m benchmarks.bench $bench_mode --out "$WORK/bench" \
      --budget-s "$(budget_for "$bmax")" ${BENCH_ARGS:-}
  if [[ "${BENCH_FULL:-0}" != "1" && "${SUITE_LLAMA:-1}" == "1" ]]; then
    step "llama training benchmark" 80 bash -c llama
  fi
  collect
  echo "gpu_suite done in $(( $(date +%s) - START ))s"
}

main 2>&1 | tee "$OUT/suite.log"
