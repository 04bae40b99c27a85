import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import jax_grouped_attn as ga
mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((2, 512, 8, 64)), jnp.bfloat16)
k, v = (jnp.asarray(rng.standard_normal((2, 512, 2, 64)), jnp.bfloat16) for _ in range(2))
for be in ("pallas", "triton"):
  attn = lambda q, k, v: ga.attention(q, k, v, causal=True, backend=be)
  f = jax.shard_map(attn, mesh=mesh, in_specs=(P(None, "sp"), P(), P()), out_specs=P(None, "sp"), check_vma=True)
  loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2))
  try:
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(attn), argnums=(0, 1, 2))(q, k, v)
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want))
    print(be, "shard_map check_vma=True on GPU: grads max diff vs plain", err)
  except Exception as e:
    print(be, "FAILED", type(e).__name__, str(e)[:400])
