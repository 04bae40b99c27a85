"""Where a zigzag W8 S64K headline pair's seconds go (issue 32): the whole-tensor
oracle per rank (two logits-block sizes), and compiling each rank's executables
serially vs in a thread pool. GPU only; prints one line per measurement."""

import concurrent.futures as cf
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from benchmarks import common, impls  # noqa: E402


def oracle_costs():
  for max_elems in (1 << 26, 1 << 28):
    common._ORACLE_CACHE.clear()
    for r in range(3):
      wl = common.zigzag_workload(8, 65536, r)
      g = common.make_global_inputs(wl, 0)
      q, k, v, do = common.local_inputs(wl, g)
      timing = {}
      t0 = time.perf_counter()
      want = common.oracle(wl, q, k, v, do, max_elems=max_elems, timing=timing)
      jax.block_until_ready(want)
      print(f"oracle max_elems 2^{max_elems.bit_length() - 1} rank {r}: "
            f"{time.perf_counter() - t0:.2f} s (compile {timing.get('compile_s', 0):.2f}, "
            f"run {timing.get('run_s', 0):.2f})", flush=True)
      del want


def build(name, wl):
  impl = impls.all_impls()[name]
  built = impl.build(wl, impls.Context(gpu=True))
  q, k, v, do = common.make_inputs(wl, 0)
  fwd = built.fwd_fn or built.fn
  t0 = time.perf_counter()
  lf = jax.jit(fwd).lower(q, k, v)
  lb = jax.jit(lambda q, k, v, do: jax.vjp(built.fn, q, k, v)[1](do)).lower(q, k, v, do)
  t1 = time.perf_counter()
  lf.compile()
  lb.compile()
  return t1 - t0, time.perf_counter() - t1


def compile_costs():
  for name in ("pallas_mosaic", "cudnn"):
    wls = [common.zigzag_workload(8, 65536, r) for r in range(8)]
    t0 = time.perf_counter()
    for wl in wls[:3]:
      lo, co = build(name, wl)
      print(f"{name} rank {wl.rank}: lower {lo:.2f} s, compile {co:.2f} s", flush=True)
    serial = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as pool:
      list(pool.map(lambda wl: build(name, wl), wls[3:7]))
    par = (time.perf_counter() - t0) / 4
    print(f"{name}: serial {serial:.2f} s per rank; 4 threads {par:.2f} s per rank (wall)",
          flush=True)


if __name__ == "__main__":
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  compile_costs()
  oracle_costs()
