"""Every bad input raises a clear error naming the argument, before any kernel runs."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from jax_grouped_attn import QueryGroup

B, T, H, D = 2, 16, 4, 64


def arr(shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


Q, K, V = arr((B, T, H, D)), arr((B, T, 2, D)), arr((B, T, 2, D))
G = [QueryGroup(0, T, 0, T)]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(q=arr((B, T, H))), ValueError, r"q\.shape=.*rank 3"),
    (dict(k=arr((B, T, 3, D)), v=arr((B, T, 3, D))), ValueError, "multiple of kv heads"),
    (dict(k=arr((B, T, 2, D), jnp.bfloat16)), ValueError, "share one dtype"),
    (dict(q=arr((B, T, H, D), jnp.int32), k=arr((B, T, 2, D), jnp.int32),
          v=arr((B, T, 2, D), jnp.int32)), ValueError, "not supported"),
    (dict(v=arr((B, T + 1, 2, D))), ValueError, "same batch, length and heads"),
    (dict(k=arr((B + 1, T, 2, D)), v=arr((B + 1, T, 2, D))), ValueError, "batch"),
    (dict(q=arr((B, T, H, 36)), k=arr((B, T, 2, 36)), v=arr((B, T, 2, 36))),
     ValueError, "head_dim"),
    (dict(q=arr((B, T, H, 264)), k=arr((B, T, 2, 264)), v=arr((B, T, 2, 264))),
     ValueError, "head_dim"),
    (dict(k=arr((B, T, 2, 32)), v=arr((B, T, 2, 32))), ValueError, "head_dim mismatch"),
    (dict(groups=[QueryGroup(0, 8, 0, 16), QueryGroup(4, 12, 0, 16)]), ValueError, "overlap"),
    (dict(groups=[QueryGroup(0, 8, 0, 16)]), ValueError, "uncovered"),
    (dict(groups=[QueryGroup(0, T, 0, T + 1)]), ValueError, "kv_len"),
    (dict(groups="abc"), TypeError, "groups"),
    (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32)), ValueError, "kv_segment_ids"),
    (dict(q_segment_ids=jnp.zeros((B, T + 1), jnp.int32),
          kv_segment_ids=jnp.zeros((B, T), jnp.int32)), ValueError, r"q_segment_ids\.shape"),
    (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32),
          kv_segment_ids=jnp.zeros((B, T), jnp.float32)), ValueError, r"kv_segment_ids\.dtype"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    (dict(softmax_scale=jnp.array([0.1, 0.2])), TypeError, "softmax_scale"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(backward="magic"), ValueError, "backward"),
    (dict(config=dict(block_q=64)), TypeError, "config"),
    (dict(local_window_size=-1), ValueError, "local_window_size"),
    (dict(local_window_size=(3, -2)), ValueError, "local_window_size.*right"),
    (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
    (dict(local_window_size=2.5), TypeError, "local_window_size"),
    (dict(local_window_size=(True, 1)), TypeError, "local_window_size"),
])
def test_grouped_attention_rejects(backend, kwargs, exc, msg):
  args = dict(q=Q, k=K, v=V, groups=G)
  args.update(kwargs)
  q, k, v, groups = (args.pop(n) for n in ("q", "k", "v", "groups"))
  with pytest.raises(exc, match=msg):
    ga.grouped_attention(q, k, v, groups, backend=backend, **args)


def test_unknown_backend_and_interpret_without_gpu():
  with pytest.raises(ValueError, match="backend='cuda' is unknown"):
    ga.attention(Q, K, V, backend="cuda")
  with pytest.raises(ValueError, match="interpret=False needs a GPU"):
    ga.attention(Q, K, V, backend="pallas", interpret=False)
  with pytest.raises(ValueError, match="interpret=True has no meaning"):
    ga.attention(Q, K, V, backend="xla", interpret=True)


def test_config_block_sizes_checked():
  with pytest.raises(ValueError, match="block_q"):
    ga.ForwardConfig(block_q=48)
  with pytest.raises(ValueError, match="block_k"):
    ga.BackwardConfig(block_k=8)
  with pytest.raises(ValueError, match="num_warps"):
    ga.ForwardConfig(num_warps=3)
  with pytest.raises(TypeError, match="forward"):
    ga.AttentionConfig(forward=ga.BackwardConfig())
  with pytest.raises(ValueError, match=r"BackwardConfig\.dq_block_q=24"):
    ga.BackwardConfig(dq_block_q=24)
  with pytest.raises(ValueError, match=r"BackwardConfig\.dq_block_k=512"):
    ga.BackwardConfig(dq_block_k=512)
  with pytest.raises(ValueError, match=r"BackwardConfig\.dq_num_warps=3"):
    ga.BackwardConfig(dq_num_warps=3)
  with pytest.raises(ValueError, match=r"BackwardConfig\.dq_num_stages=0"):
    ga.BackwardConfig(dq_num_stages=0)


def test_attention_segment_ids_shortcut_needs_self_attention():
  with pytest.raises(ValueError, match="self-attention"):
    ga.attention(Q, arr((B, T + 2, 2, D)), arr((B, T + 2, 2, D)),
                 segment_ids=jnp.zeros((B, T), jnp.int32), backend="xla")
  with pytest.raises(ValueError, match="not both"):
    ga.attention(Q, K, V, segment_ids=jnp.zeros((B, T), jnp.int32),
                 q_segment_ids=jnp.zeros((B, T), jnp.int32), backend="xla")


def test_errors_raise_before_tracing_under_jit():
  import jax
  f = jax.jit(lambda q, k, v: ga.attention(q, k, v, backend="pallas"))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    f(Q, arr((B, T, 3, D)), arr((B, T, 3, D)))


def test_softmax_scale_concrete_scalars_work_traced_raise():
  import jax
  want = ga.attention(Q, K, V, softmax_scale=0.1, backend="xla")
  for s in (jnp.float32(0.1), np.float64(0.1), jnp.asarray(0.1)):
    np.testing.assert_allclose(ga.attention(Q, K, V, softmax_scale=s, backend="xla"), want,
                               rtol=1e-6)
  f = jax.jit(lambda s: ga.attention(Q, K, V, softmax_scale=s, backend="xla"))
  with pytest.raises(ValueError, match="softmax_scale is a traced value"):
    f(0.1)
