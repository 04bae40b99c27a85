"""The GPU's own ptxas report of the Mosaic kernels, to check devtools/mosaic_ptxas.py.

On the device: MOSAIC_GPU_DUMP_PTXAS=1 python3 notes/experiments/ptxas_on_gpu.py
jaxlib prints ptxas -v of each kernel as it compiles it (at the first call);
the script prints a marker before each, so the log reads kernel by kernel. Compare
with ``python -m devtools.mosaic_ptxas --kernels forward,overlap,backward,backward_overlap,fused,ordered``
on the CPU machine (same problem: D128, causal, S512, Hq4 Hk2).
"""
import jax
import jax.numpy as jnp

from devtools import mosaic_ptxas as mp
from jax_grouped_attn.pallas.mosaic.backend import PALLAS_MOSAIC


def main():
  p = mp.problem(d=128)
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (1, p.tq, p.hq, 128), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, p.tk, p.hk, 128), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, p.tk, p.hk, 128), jnp.bfloat16)
  lse = jnp.zeros((1, p.hq, p.tq), jnp.float32)
  for name in ("forward", "overlap", "backward", "backward_overlap", "fused", "ordered"):
    kind, cfg, labels = mp.KERNELS[name]
    cfg = cfg(p) if callable(cfg) else cfg
    print(f"===== {name}: {labels} =====", flush=True)
    if kind == "forward":
      f = jax.jit(lambda q, k, v, cfg=cfg: PALLAS_MOSAIC.forward(p, cfg, False, q, k, v,
                                                                  None, None))
      jax.block_until_ready(f(q, k, v))
    else:
      f = jax.jit(lambda q, k, v, o, lse, do, dlse, cfg=cfg: PALLAS_MOSAIC.backward(
          p, cfg, False, q, k, v, None, None, o, lse, do, dlse))
      jax.block_until_ready(f(q, k, v, q, lse, q, lse))


if __name__ == "__main__":
  main()
