"""The reference implementation (the ``xla`` backend): plain jnp, fp32 softmax.

It materialises the [B, Hq, Tq, Tk] logits, so it is for tests, benchmarks'
ground truth and small problems. Differentiable by JAX autodiff, NaN-free on
fully masked rows (out 0, lse -inf, zero gradient).

``compute_dtype`` (default float32: exact fp32 math) rounds every matmul
operand to that dtype, accumulating in fp32, as a flash kernel on 16-bit
inputs does: P (and dS) are rounded before their dots, softmax stays fp32.
Tests use it as the "plain low-precision attention" whose error calibrates
the tolerances (jax_grouped_attn/testing.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.backend import Backend
from jax_grouped_attn.groups import row_positions, visible
from jax_grouped_attn.plan import Problem


def visible_mask(problem: Problem, q_segment_ids=None, kv_segment_ids=None):
  """Boolean mask [B or 1, 1, Tq, Tk] of the pairs a row may see (see groups.py)."""
  pos, kv_len = row_positions(problem.groups, problem.tq)
  qs = None if q_segment_ids is None else q_segment_ids[:, None, :, None]
  ks = None if kv_segment_ids is None else kv_segment_ids[:, None, None, :]
  mask = visible(pos[None, None, :, None], np.arange(problem.tk)[None, None, None, :],
                 kv_len[None, None, :, None], causal=problem.causal, q_seg=qs, kv_seg=ks,
                 window=problem.window)
  return jnp.asarray(mask)


def _einsum(spec, a, b, dtype):
  """einsum with both operands rounded to ``dtype``, fp32 accumulation."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def soft_cap(s, softcap: float | None):
  """Gemma 2's logit soft-capping: (c * tanh(s / c), its derivative 1 - tanh^2),
  or (s, None) when ``softcap`` is None."""
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, 1.0 - t * t


def reference_attention(problem: Problem, q, k, v, q_segment_ids=None,
                        kv_segment_ids=None, *, compute_dtype=jnp.float32):
  """Returns (out [B, Tq, Hq, Dv] in q.dtype, lse [B, Hq, Tq] float32); v: [B, Tk, Hk, Dv]."""
  b, tq, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  cd = compute_dtype
  qf = q.astype(cd).reshape(b, tq, hk, g, d)
  kf = k.astype(cd)
  vf = v.astype(cd)
  s, _ = soft_cap(_einsum("bqhgd,bkhd->bhgqk", qf, kf, cd) * problem.scale, problem.softcap)
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
  pv = _einsum("bhgqk,bkhd->bqhgd", p.reshape(b, hk, g, tq, problem.tk), vf,
               cd).reshape(b, tq, hq, v.shape[3])
  out = pv / jnp.moveaxis(l_safe[..., 0], 1, 2)[..., None]
  lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)[..., 0]
  return out.astype(q.dtype), lse


def reference_backward(problem: Problem, q, k, v, q_segment_ids, kv_segment_ids,
                       out, lse, dout, dlse, *, compute_dtype=jnp.float32):
  """Explicit flash-attention backward given (possibly global) out and lse.

  With P = exp(S - lse) on visible pairs:
    dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * O) - dlse,
    dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q
  (with a soft cap, S = c tanh(scale q.k / c) and dS carries 1 - tanh^2).
  Passing the *merged* out/lse of several kv chunks gives each chunk's exact
  share of the gradient (what the context-parallel ring needs). fp32 math;
  returns dq, dk, dv in the input dtypes. dK/dV sum over query heads of a kv head.
  """
  b, tq, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  hi = jax.lax.Precision.HIGHEST
  cd = compute_dtype
  f32 = lambda x: x.astype(jnp.float32)
  qf = q.astype(cd).reshape(b, tq, hk, g, d)
  kf, vf = k.astype(cd), v.astype(cd)
  s, cap_grad = soft_cap(_einsum("bqhgd,bkhd->bhgqk", qf, kf, cd) * problem.scale,
                         problem.softcap)
  mask = visible_mask(problem, q_segment_ids, kv_segment_ids).reshape(
      (-1, 1, 1, tq, problem.tk))
  lse_g = lse.reshape(b, hk, g, tq)[..., None]
  finite = jnp.isfinite(lse_g)
  p = jnp.where(mask & finite, jnp.exp(s - jnp.where(finite, lse_g, 0.0)), 0.0)
  do = dout.astype(cd).reshape(b, tq, hk, g, problem.dv)
  o = f32(out).reshape(b, tq, hk, g, problem.dv)
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", f32(do), o, precision=hi)
  delta = delta - f32(dlse).reshape(b, hk, g, tq)
  dp = _einsum("bqhgd,bkhd->bhgqk", do, vf, cd)
  ds = p * (dp - delta[..., None])
  if cap_grad is not None:
    ds = ds * cap_grad
  dv = _einsum("bhgqk,bqhgd->bkhd", p, do, cd)
  dq = _einsum("bhgqk,bkhd->bqhgd", ds, kf, cd).reshape(b, tq, hq, d)
  dk = _einsum("bhgqk,bqhgd->bkhd", ds, qf, cd)
  return ((dq * problem.scale).astype(q.dtype), (dk * problem.scale).astype(k.dtype),
          dv.astype(v.dtype))


class XlaBackend(Backend):
  """The reference as a backend: plain jnp, differentiated by JAX (its
  ``backward`` is the explicit formula, for the context-parallel ring)."""

  name = "xla"
  interpretable = True
  native_autodiff = True
  supports_softcap = True
  supports_head_dim_v = True

  def check_launchable(self, problem, dtype, interpret, *arrays):
    if interpret:
      raise ValueError("interpret=True has no meaning for backend='xla' (plain jnp).")

  def forward(self, problem, config, interpret, q, k, v, q_seg, kv_seg):
    return reference_attention(problem, q, k, v, q_seg, kv_seg)

  def backward(self, problem, config, interpret, q, k, v, q_seg, kv_seg, out, lse,
               dout, dlse):
    return reference_backward(problem, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)


XLA = XlaBackend()
