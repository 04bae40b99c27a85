"""One process of a two-process context-parallel run on one machine (CPU).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT
Each process owns 2 CPU devices; together they form a 4-device mesh. Both
strategies' outputs and gradients are checked against the single-device
reference; prints "OK <process_id>" and exits 0 on success.
"""

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if "xla_force_host_platform_device_count" not in f)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

LOCAL_DEVICES = 2


def main(process_id: int, num_processes: int, port: int) -> None:
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jax_grouped_attn as ga

  world = jax.device_count()
  assert world == LOCAL_DEVICES * num_processes, (world, jax.devices())
  assert jax.local_device_count() == LOCAL_DEVICES
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("cp",))
  replicated = NamedSharding(mesh, P())

  b, s, hq, hk, d = 2, 16 * world, 4, 2, 32
  rng = np.random.default_rng(0)   # same seed: identical global data everywhere
  host = [rng.standard_normal(shape).astype(np.float32)
          for shape in ((b, s, hq, d), (b, s, hk, d), (b, s, hk, d), (b, s, hq, d))]
  seg = np.sort(rng.integers(0, 3, (b, s)), axis=1).astype(np.int32)
  glob = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i])
  q, k, v, dout = (glob(x) for x in host)
  seg_g = glob(seg)

  # Reference on this process's first device, from host data.
  dev = jax.local_devices()[0]
  loc = lambda x: jax.device_put(x, dev)

  def ref_fn(q, k, v, seg):
    f = lambda q, k, v: ga.attention(q, k, v, causal=True, segment_ids=seg, backend="xla")
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(loc(host[3]))

  want = jax.jit(ref_fn)(*(loc(x) for x in host[:3]), loc(seg))
  want = [np.asarray(x) for x in want]

  for strategy in ("allgather", "ring"):
    def cp_fn(q, k, v, seg, dout):
      f = lambda q, k, v: ga.context_parallel_attention(
          q, k, v, mesh, "cp", strategy=strategy, causal=True, segment_ids=seg,
          backend="xla")
      out, vjp = jax.vjp(f, q, k, v)
      return (out,) + vjp(dout)

    got = jax.jit(cp_fn, out_shardings=replicated)(q, k, v, seg_g, dout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
      g = np.asarray(g.addressable_data(0))
      err = float(np.max(np.abs(g - w)))
      tol = 1e-4 * max(1.0, float(np.max(np.abs(w))))
      if not err <= tol:
        raise AssertionError(
            f"process {process_id} {strategy} {name}: max err {err:.3g} > {tol:.3g}")
  print(f"OK {process_id}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
