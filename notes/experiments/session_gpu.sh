#!/usr/bin/env bash
# One session's GPU runs, from the repository root on the device; modes run in order:
#   bash notes/experiments/session_gpu.sh tests mutants   # GPU tests + memcheck; the gpu= mutants
#   bash notes/experiments/session_gpu.sh bench window tune ncu  # headline shapes vs cuDNN;
#       sliding window time vs S; Mosaic configs tuned; ncu of Mosaic and cuDNN fwd+bwd kernels
#   bash notes/experiments/session_gpu.sh issue33   # Mosaic GPU tests, then fused_bwd.py
#       (fwd and fwd+bwd vs cuDNN: fused, ordered, kv_major, overlapped forward)
# Expects the jax-triton wheel installed into PYTHONPATH (device README) and writes to $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
  git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/versions.log"
for mode in "${@:-tests}"; do
  echo "=== $mode ($(date -u +%T))"
  case $mode in
  tests)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TESTS_S:-330} python3 -m pytest -q -p no:cacheprovider -rs \
        -n 8 -W ignore::DeprecationWarning -m "gpu and not big" tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -W ignore::DeprecationWarning \
        -m "gpu and big" tests 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -8
    (cd "$OUT" && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 compute-sanitizer --tool memcheck \
       python3 "$OLDPWD/notes/experiments/memcheck_target.py" > memcheck.log 2>&1; echo "exit $?" >> memcheck.log)
    tail -5 "$OUT/memcheck.log";;
  mutants)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${MUTANTS_S:-240} python3 tests/mutation/kit.py --gpu \
        --jobs 3 --timeout 220 2>&1 | tee "$OUT/mutants_gpu.log" | tail -12;;
  bench)
    B="--backends pallas_mosaic,triton,cudnn --passes fwd,fwdbwd"
    timeout ${BENCH_S:-200} python3 -m benchmarks.bench --workloads causal $B --budget-s $(( ${BENCH_S:-200} - 30 )) \
        --shape 1x8192x32x8x128 --shape 1x32768x32x8x128 --out "$OUT/causal" 2>&1 | tail -30
    for f in bench.md bench.json; do [[ -f $OUT/causal/$f ]] && mv "$OUT/causal/$f" "$OUT/causal_$f"; done
    rm -rf "$OUT/causal";;
  window)
    timeout ${WINDOW_S:-240} python3 -m benchmarks.bench --workloads window --out "$OUT/window" \
        --backends pallas_mosaic,triton,cudnn --budget-s $(( ${WINDOW_S:-240} - 30 )) 2>&1 | tail -40
    cp "$OUT/window/bench.md" "$OUT/window.md" 2>/dev/null;;
  tune)   # Mosaic configs into (a copy of) the package's table: commit $OUT/tuned/*.json
    mkdir -p "$OUT/tuned" && cp jax_grouped_attn/tuned/*.json "$OUT/tuned/"
    timeout ${TUNE_S:-240} python3 -m benchmarks.tune --quick --backends pallas_mosaic \
        --head-dims ${TUNE_DIMS:-128,64,256} --budget-s $(( ${TUNE_S:-240} - 30 )) --out "$OUT/tuned" 2>&1 | tail -25;;
  ncu)
    # Only our Pallas kernels (*_kernel) and cuDNN's (sdpa): XLA's autotuning and
    # fusion kernels are skipped.
    timeout ${NCU_S:-150} ncu --clock-control none --target-processes all \
        -k "regex:${NCU_KERNELS:-_kernel|sdpa|mosaic}" --launch-count ${NCU_COUNT:-10} \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats \
        python3 notes/experiments/ncu_target.py ${NCU_IMPLS:-pallas_mosaic cudnn} > "$OUT/ncu.log" 2>&1
    echo "ncu exit $?"; grep -E "^  [a-zA-Z_].*\(|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" "$OUT/ncu.log" | head -60;;
  issue33)   # the Mosaic kernels issue 33 changes: the GPU's ptxas, GPU tests, timings vs cuDNN
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python3 notes/experiments/ptxas_on_gpu.py \
        > "$OUT/ptxas_on_gpu.log" 2>&1; grep -E "=====|spill|Used|C75" "$OUT/ptxas_on_gpu.log"
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${I33_TESTS_S:-200} python3 -m pytest -q \
        -p no:cacheprovider -rs -n 8 -W ignore::DeprecationWarning -m gpu tests/test_mosaic.py \
        2>&1 | tee "$OUT/mosaic_gpu_tests.log" | tail -15
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${I33_BENCH_S:-270} python3 \
        notes/experiments/fused_bwd.py --shapes ${I33_SHAPES:-s8k,d64,s32k} --passes 2 \
        2>&1 | tee "$OUT/fused_bwd.log" | tail -40;;
  *) echo "unknown mode $mode";;
  esac
done
