"""compute-sanitizer target: Mosaic GPU fwd+bwd with groups, GQA, segments and windows (bf16)."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_grouped_attn as ga

rng = np.random.default_rng(0)
b, t, hq, hk, d = 1, 320, 4, 2, 128
q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.bfloat16)
k = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.bfloat16)
v = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.bfloat16)
seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t))), jnp.int32)
groups = (ga.QueryGroup(0, 200, 120, 320), ga.QueryGroup(200, 120, 0, 130))
for segs, window in ((None, None), (seg, None), (None, (70, 0)), (seg, (33, 0))):
  f = lambda q, k, v: ga.grouped_attention(q, k, v, groups, q_segment_ids=segs,
                                           kv_segment_ids=segs, backend="pallas_mosaic",
                                           local_window_size=window)
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(jnp.ones_like(out))
  jax.block_until_ready(grads)
  print("ok", segs is not None, window, float(jnp.abs(out.astype(jnp.float32)).sum()))
