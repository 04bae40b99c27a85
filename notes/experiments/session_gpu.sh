#!/usr/bin/env bash
# One session's GPU runs (2026-11-26), from the repository root on the device:
#   bash notes/experiments/session_gpu.sh tests   # GPU tests, Mosaic property tests, memcheck
#   bash notes/experiments/session_gpu.sh bench   # headline shapes + zigzag W8, every backend vs cuDNN
# Expects the jax-triton wheel installed into PYTHONPATH (device README) and writes to $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
[[ -e jax_grouped_attn/pallas ]] || ln -s ../pallas jax_grouped_attn/pallas   # as pyproject installs it
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
mode=${1:-tests}
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
} 2>&1 | tee "$OUT/versions.log"
if [[ $mode == tests ]]; then
  # Mosaic property tests beside the GPU-marked suite (they only share the GPU).
  (JGA_PROPERTY_PROFILE=gpu XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 330 python3 -m pytest -q \
     -p no:cacheprovider -rs -s tests/test_properties.py -k pallas_mosaic \
     > "$OUT/properties_mosaic.log" 2>&1; echo "exit $?" >> "$OUT/properties_mosaic.log") &
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 360 python3 -m pytest -q -p no:cacheprovider -rs \
      -n 8 -W ignore::DeprecationWarning -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  (cd "$OUT" && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 compute-sanitizer --tool memcheck \
     python3 "$OLDPWD/notes/experiments/memcheck_target.py" > memcheck.log 2>&1; echo "exit $?" >> memcheck.log)
  tail -5 "$OUT/memcheck.log"
  wait
  tail -8 "$OUT/properties_mosaic.log"
else
  B="--backends pallas_mosaic,triton,pallas_triton,cudnn --passes fwd,bwd,fwdbwd"
  timeout 280 python3 -m benchmarks.bench --workloads causal $B --budget-s 250 \
      --shape 1x8192x32x8x128 --shape 1x32768x32x8x128 --shape 4x4096x16x16x64 \
      --shape 1x8192x16x16x256 --out "$OUT/causal" 2>&1 | tail -60
  timeout 250 python3 -m benchmarks.bench --workloads zigzag --zigzag 8x65536 --budget-s 220 \
      --backends pallas_mosaic,cudnn,two-launch --passes fwd,fwdbwd --out "$OUT/zigzag" 2>&1 | tail -40
  for d in causal zigzag; do for f in bench.md bench.json; do
    [[ -f $OUT/$d/$f ]] && mv "$OUT/$d/$f" "$OUT/${d}_$f"; done; done
  [[ -f $OUT/causal/bench_grouped_vs_baselines.png ]] && mv "$OUT/causal/bench_grouped_vs_baselines.png" "$OUT/causal.png"
  rm -rf "$OUT/causal" "$OUT/zigzag"
fi
