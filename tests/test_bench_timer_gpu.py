"""The benchmark's timer against an independent measure of device time (GPU)."""

import os
import statistics
import sys
import time

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench, common, impls  # noqa: E402

pytestmark = pytest.mark.gpu


def _long_loop_ms(compiled, arg_sets, calls: int, repeats: int = 3) -> float:
  """Per-call time of ``calls`` back-to-back calls ended by one sync (median of
  ``repeats``): launch and sync latency spread over so many calls is < 0.1%."""
  out = []
  for _ in range(repeats):
    jax.block_until_ready(compiled(*arg_sets[0]))
    t0 = time.perf_counter()
    results = [compiled(*arg_sets[i % len(arg_sets)]) for i in range(calls)]
    jax.block_until_ready(results)
    out.append((time.perf_counter() - t0) * 1e3 / calls)
    del results
  return statistics.median(out)


def test_bench_time_of_cudnn_forward_is_its_device_time():
  if not common.on_gpu():
    pytest.skip("needs a GPU")
  wl = common.causal_workload(1, 8192, 32, 8, 128)
  built = impls.Cudnn().build(wl, impls.Context(gpu=True))
  sets = [common.make_inputs(wl, seed)[:3] for seed in range(2)]
  compiled = jax.jit(built.fn).lower(*sets[0]).compile()
  quick = bench.TIMING["quick"]
  got = common.time_calls(compiled, sets, **quick)
  ref = _long_loop_ms(compiled, sets, calls=400)
  # The old timer: every call synchronised on its own.
  per_call = common.time_calls(compiled, sets, rounds=10, warmup=1, calls=1)
  print(f"\ncuDNN fwd {wl.name}: bench {got['median_ms']:.4f} ms ({got['calls']} calls x "
        f"{got['rounds']} rounds, spread {100 * got['spread']:.1f}%), 400-call loop "
        f"{ref:.4f} ms, per-call sync {per_call['median_ms']:.4f} ms", flush=True)
  assert abs(got["median_ms"] - ref) <= 0.05 * ref, (got, ref)
  assert got["calls"] >= 2 and got["spread"] < 0.15, got
  # What the old per-call timing added (launch and sync latency) is gone.
  assert per_call["median_ms"] > got["median_ms"], (per_call, got)
