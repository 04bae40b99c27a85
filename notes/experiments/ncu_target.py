"""ncu target: one jitted fwd+bwd of each named implementation (default all),
bf16 causal, B1 S8192 Hq32 Hk8 D128 unless NCU_SHAPE=SxHqxHkxD says otherwise:
  python3 notes/experiments/ncu_target.py [pallas_mosaic] [triton] [pallas_triton] [cudnn]
(``<backend>+softcap``: the same with logits_soft_cap=NCU_SOFTCAP, default 50)"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_grouped_attn as ga

S, HQ, HK, D = (int(x) for x in os.environ.get("NCU_SHAPE", "8192x32x8x128").split("x"))
rng = np.random.default_rng(0)
mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
q, k, v, do = mk(1, S, HQ, D), mk(1, S, HK, D), mk(1, S, HK, D), mk(1, S, HQ, D)
IMPLS = {
    b: (lambda q, k, v, b=b: ga.attention(q, k, v, causal=True, backend=b))
    for b in ("pallas_mosaic", "triton", "pallas_triton")}
# The same calls with Gemma 2's logit soft cap (NCU_SOFTCAP, default 50).
CAP = float(os.environ.get("NCU_SOFTCAP", "50"))
IMPLS.update({
    f"{b}+softcap": (lambda q, k, v, b=b: ga.attention(q, k, v, causal=True, backend=b,
                                                       logits_soft_cap=CAP))
    for b in ("pallas_mosaic", "triton", "pallas_triton")})
IMPLS["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation="cudnn")
for name in sys.argv[1:] or list(IMPLS):
  f = IMPLS[name]
  g = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))
  jax.block_until_ready(g(q, k, v))
  print(name, "done", flush=True)
