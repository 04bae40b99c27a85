"""The reference implementation (the ``xla`` backend): plain jnp, fp32 softmax.

It materialises the [B, Hq, Tq, Tk] logits, so it is for tests, benchmarks'
ground truth and small problems. Differentiable by JAX autodiff, NaN-free on
fully masked rows (out 0, lse -inf, zero gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.groups import row_positions
from jax_grouped_attn.plan import Problem


def visible_mask(problem: Problem, q_segment_ids=None, kv_segment_ids=None):
  """Boolean mask [B or 1, 1, Tq, Tk] of the pairs a row may see (see groups.py)."""
  pos, kv_len = row_positions(problem.groups, problem.tq)
  j = np.arange(problem.tk)
  mask = j[None, :] < kv_len[:, None]
  if problem.causal:
    mask &= j[None, :] <= pos[:, None]
  mask = jnp.asarray(mask)[None, None]
  if q_segment_ids is not None:
    seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & seg[:, None]
  return mask


def reference_attention(problem: Problem, q, k, v, q_segment_ids=None,
                        kv_segment_ids=None):
  """Returns (out [B, Tq, Hq, D] in q.dtype, lse [B, Hq, Tq] float32)."""
  b, tq, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  qf = q.astype(jnp.float32).reshape(b, tq, hk, g, d)
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=hi) * problem.scale
  s = s.reshape(b, hq, tq, problem.tk)
  mask = visible_mask(problem, q_segment_ids, kv_segment_ids)
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  # The max cancels mathematically; a finite, gradient-free stand-in keeps
  # fully masked rows (m = -inf) from producing NaN.
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)                       # masked entries: exp(-inf) = 0
  l = jnp.sum(p, axis=-1, keepdims=True)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.reshape(b, hk, g, tq, problem.tk), vf,
                  precision=hi).reshape(b, tq, hq, d)
  out = pv / jnp.moveaxis(l_safe[..., 0], 1, 2)[..., None]
  lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)[..., 0]
  return out.astype(q.dtype), lse
