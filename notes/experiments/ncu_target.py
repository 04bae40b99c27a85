"""One launch each of the kernels to profile (S8192 Hq32 Hk8 D128 bf16 causal):
triton fwd+bwd, pallas fwd+bwd, cudnn fwd+bwd."""
import jax, jax.numpy as jnp, numpy as np
import jax_grouped_attn as ga
S, HQ, HK, D = 8192, 32, 8, 128
rng = np.random.default_rng(0)
mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
q, k, v, do = mk(1, S, HQ, D), mk(1, S, HK, D), mk(1, S, HK, D), mk(1, S, HQ, D)
for name, f in [
    ("triton", lambda q, k, v: ga.attention(q, k, v, causal=True, backend="triton")),
    ("pallas", lambda q, k, v: ga.attention(q, k, v, causal=True, backend="pallas")),
    ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))]:
  g = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))
  jax.block_until_ready(g(q, k, v))
  print(name, "done", flush=True)
