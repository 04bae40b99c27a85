"""Pallas kernel bodies (no shapes, grids or launch logic here).

Refs of one program (after the launcher's BlockSpecs squeeze batch and head):
  table_ref: [n_work, TABLE_WIDTH] int32  forward work table (plan.py)
  q_ref:     [Tq_pad, Dp]   the (batch, q head) slab of padded q
  k_ref:     [Tk_pad, Dp]   the (batch, kv head) slab of padded k
  v_ref:     [Tk_pad, Dp]
  qseg_ref:  [Tq_pad] int32, kvseg_ref: [Tk_pad] int32   (only with segments)
  out_ref:   [Tq_pad, Dp]   lse_ref: [Tq_pad] float32
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_grouped_attn import plan as plan_lib

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# pl.dot moved to the triton namespace; older JAX only has pl.dot.
_pl_dot = getattr(plgpu, "dot", None) or pl.dot


def _dot(a, b, *, trans_b=False, precision=None):
  return _pl_dot(a, b, trans_b=trans_b, precision=precision)


def forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs, scale: float,
                   causal: bool, has_segments: bool, block_q: int,
                   block_k: int, precision):
  if has_segments:
    qseg_ref, kvseg_ref, out_ref, lse_ref = refs
  else:
    out_ref, lse_ref = refs
  w = pl.program_id(0)
  row0 = table_ref[w, plan_lib.ROW0]
  q_pos0 = table_ref[w, plan_lib.QPOS0]
  kv_len = table_ref[w, plan_lib.KV_LEN]
  n_full = table_ref[w, plan_lib.N_FULL]
  n_blocks = table_ref[w, plan_lib.N_BLOCKS]

  rows = pl.ds(row0, block_q)
  q = q_ref[rows, :]
  dp = q.shape[-1]
  q_pos = q_pos0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  qseg = qseg_ref[rows][:, None] if has_segments else None
  qk_scale = scale * LOG2E  # logits in base 2: exp(x) == exp2(x * log2 e)

  def step(j, carry, masked):
    acc, m_prev, l_prev = carry
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    s = _dot(q, k, trans_b=True, precision=precision) * qk_scale  # [bq, bk]
    if masked:
      kj = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      visible = kj < kv_len
      if causal:
        visible = visible & (kj <= q_pos)
      if has_segments:
        visible = visible & (qseg == kvseg_ref[keys][None, :])
      s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    if masked:
      # A row that has seen nothing yet keeps m = -inf; subtract 0 instead
      # so exp2(-inf - -inf) never makes NaN.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    pv = _dot(p.astype(v.dtype), v, precision=precision)
    return acc * alpha[:, None] + pv, m_new, l_new

  carry = (jnp.zeros((block_q, dp), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = jax.lax.fori_loop(0, n_full, lambda j, c: step(j, c, False), carry)
  carry = jax.lax.fori_loop(n_full, n_blocks, lambda j, c: step(j, c, True), carry)
  acc, m, l = carry
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out_ref[rows, :] = (acc / l_safe[:, None]).astype(out_ref.dtype)
  lse_ref[rows] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
