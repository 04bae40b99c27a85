"""MLA shapes (q/k head_dim DQK, v head_dim DV), fwd+bwd, bf16 causal B1 S8192 H16:
this package with v [.., DV] against the workaround (v zero-padded to DQK, out
sliced) and, where jax exposes it, cuDNN with the two head dims (interleaved in
one process, medians of 10).
  python3 notes/experiments/mla_timing.py [DQKxDV ...]     (default 192x128 128x64)"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_grouped_attn as ga
from benchmarks.common import time_calls

S, H = 8192, 16
rng = np.random.default_rng(0)
for spec in sys.argv[1:] or ["192x128", "128x64"]:
  dqk, dv = (int(x) for x in spec.split("x"))
  mk = lambda d: jnp.asarray(rng.standard_normal((1, S, H, d)), jnp.bfloat16)
  q, k, v, do = mk(dqk), mk(dqk), mk(dv), mk(dv)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dqk - dv)))
  fns = {
      "ours (v Dv)": lambda q, k, v: ga.attention(q, k, v, causal=True),
      "padded v": lambda q, k, v: ga.attention(q, k, pad(v), causal=True)[..., :dv],
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn"),
  }
  grads = {}
  for name, f in fns.items():
    step = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do))
    try:
      jax.block_until_ready(step(q, k, v))
      grads[name] = step
    except Exception as e:  # noqa: BLE001 -- say why a row is missing
      print(f"D{dqk}/{dv} {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  times = {n: [] for n in grads}
  for _ in range(3):   # interleaved rounds
    for n, g in grads.items():
      times[n].append(time_calls(g, [(q, k, v)], reps=10, warmup=2)["median_ms"])
  base = float(np.median(times["padded v"])) if "padded v" in times else None
  for n, t in times.items():
    ms = float(np.median(t))
    print(f"D{dqk}/{dv} {n}: fwd+bwd {ms:.3f} ms"
          + (f", padded/this {base / ms:.2f}x" if base else ""), flush=True)
