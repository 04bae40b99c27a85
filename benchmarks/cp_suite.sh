#!/usr/bin/env bash
# Context parallelism on a 2- or 4-GPU machine, in two calls of < 8 minutes each.
# From the repository root (after the same install step as gpu_suite.sh):
#
#   OUT=dir bash benchmarks/cp_suite.sh tests   # multi-GPU tests: every strategy, both kernels
#   OUT=dir bash benchmarks/cp_suite.sh bench   # bench_cp (+ XLA flag variants, ring HLO)
#   OUT=dir bash benchmarks/cp_suite.sh llama   # Llama 1B S=32K: data vs context parallel
#
# Knobs: CP_SECONDS (overall deadline, default 450), CP_SEQS (bench_cp --seqs,
# default 65536,131072,32768), CP_VARIANTS (default default,lhs),
# CP_BENCH_ARGS (extra bench_cp flags), LLAMA_MODES (default
# dp,allgather,ring,ulysses,dp@jax-cudnn), LLAMA_ARGS (extra llama.py flags).
#
# $OUT gets at most 8 flat files. tests: cp_tests.log. bench: bench_cp.log,
# bench_cp.json, bench_cp.md, bench_cp.png and hlo_ring_<backend>_<variant>_S<seq>.txt
# (one per variant: the scheduled fwd+bwd HLO of the ring). llama: llama.log, llama.json.

set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
OUT="${OUT:-benchmarks/results/cp_suite}"
CP_SECONDS="${CP_SECONDS:-450}"
START=$(date +%s)
mkdir -p "$OUT"
left() { echo $(( CP_SECONDS - ($(date +%s) - START) )); }

part="${1:-bench}"
case "$part" in
  tests)
    {
      nvidia-smi -L; nvidia-smi topo -m
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$(left)" python3 -m pytest -q \
          -p no:cacheprovider -rs -m gpu -W ignore::DeprecationWarning \
          tests/test_parallel.py tests/test_parallel_strategies.py tests/test_bench_cp.py
      echo "=== tests exit $? after $(( $(date +%s) - START ))s"
    } 2>&1 | tee "$OUT/cp_tests.log"
    ;;
  bench)
    # No new row after the budget; a row in flight (128K: ~1 min) and the
    # reports still fit before the deadline.
    budget=$(( $(left) - 120 ))
    timeout -k 10 "$(left)" python3 -m benchmarks.bench_cp --out "$OUT" \
        --seqs "${CP_SEQS:-65536,131072,32768}" --xla-variants "${CP_VARIANTS:-default,lhs}" \
        --dump-hlo --budget-s "$budget" ${CP_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cp.log"
    echo "=== bench_cp exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/bench_cp.log"
    ;;
  llama)
    timeout -k 10 "$(left)" python3 benchmarks/llama.py --preset 1b --seq 32768 --batch 4 \
        --remat --backend triton --steps 4 --warmup 1 \
        --compare "${LLAMA_MODES:-dp,allgather,ring,ulysses,dp@jax-cudnn}" \
        --json-out "$OUT/llama.json" ${LLAMA_ARGS:-} 2>&1 | tee "$OUT/llama.log"
    echo "=== llama exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/llama.log"
    ;;
  *) echo "usage: OUT=dir bash benchmarks/cp_suite.sh tests|bench|llama"; exit 2;;
esac
