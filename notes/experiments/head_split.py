"""Mosaic backward configs vs cuDNN and Triton, fwd+bwd and bwd alone, paired in one
process (issue 22, head_split=2). Run on the GPU from the repository root:
  python3 notes/experiments/head_split.py 256:16:16 128:32:8
each argument D:Hq:Hk at S=8192 (S via $S), causal bf16; configs in CONFIGS."""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jax_grouped_attn as ga
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig as B

S = int(os.environ.get("S", 8192))
CONFIGS = {256: [B(64, 64, 64, 64, 2, 1, 1), B(64, 64, 64, 64, 2, 2, 2)],
           128: [B(), B(64, 64, 64, 64, 2, 2, 2), B(64, 64, 64, 64, 3, 2, 2)]}


def timed(fn, args, n=10):
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n * 1e3


def grad_fn(attn):
  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for spec in sys.argv[1:]:
    d, hq, hk = (int(x) for x in spec.split(":"))
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, S, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, S, hk, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, S, hk, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (1, S, hq, d), jnp.bfloat16)
    impls = {"cudnn": grad_fn(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")),
             "triton": grad_fn(lambda q, k, v: ga.attention(q, k, v, causal=True,
                                                            backend="triton"))}
    for c in CONFIGS[d]:
      impls[str(tuple(c.__dict__.values()))] = grad_fn(
          lambda q, k, v, c=c: ga.attention(q, k, v, causal=True, backend="pallas_mosaic",
                                            config=ga.AttentionConfig(backward=c)))
    ref = impls["cudnn"](q, k, v, do)
    times = {n: [] for n in impls}
    for n, f in impls.items():
      try:
        got = f(q, k, v, do)
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                  for g, r in zip(got, ref))
        print(f"D{d} {n}: max |grad - cudnn| {err:.3g}", flush=True)
      except Exception as e:   # noqa: BLE001  (an experiment: report and go on)
        print(f"D{d} {n}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        impls[n] = None
    for _ in range(5):
      for n, f in impls.items():
        if f is not None:
          times[n].append(timed(f, (q, k, v, do)))
    base = statistics.median(times["cudnn"])
    for n, ts in times.items():
      if ts:
        m = statistics.median(ts)
        print(f"D{d} Hq{hq} Hk{hk} S{S} fwd+bwd {n:40s} {m:8.3f} ms  cuDNN/this {base / m:.3f}",
              flush=True)


if __name__ == "__main__":
  main()
