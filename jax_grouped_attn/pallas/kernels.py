"""Pallas kernel bodies (no shapes, grids or launch logic here).

Refs of one program (after the launcher's BlockSpecs squeeze batch and head):
  table_ref: [n_work, TABLE_WIDTH] int32  forward work table (plan.py)
  q_ref:     [Tq_pad, Dp]   the (batch, q head) slab of padded q
  k_ref:     [Tk_pad, Dp]   the (batch, kv head) slab of padded k
  v_ref:     [Tk_pad, Dp]
  qseg_ref:  [Tq_pad] int32, kvseg_ref: [Tk_pad] int32   (only with segments)
  out_ref:   [Tq_pad, Dp]   lse_ref: [Tq_pad] float32
The backward kernels (below the forward) state their own refs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_grouped_attn import plan as plan_lib
from jax_grouped_attn.plan import LN2, LOG2E

# pl.dot moved to the triton namespace; older JAX only has pl.dot.
_pl_dot = getattr(plgpu, "dot", None) or pl.dot


def _dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  return _pl_dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _work_row(table_ref):
  """(row0, q_pos0, kv_len) of this program's work-table row."""
  w = pl.program_id(0)
  return tuple(table_ref[w, c] for c in (plan_lib.ROW0, plan_lib.QPOS0, plan_lib.KV_LEN))


def _visible(q_pos, kj, kv_len, *, causal, window=(-1, -1), qseg=None, kvseg=None):
  """The mask rule of ``groups.py``: [bq, bk] bool from q_pos [bq, 1], kj
  [1, bk] (and segment ids [bq, 1] / [1, bk]); ``window`` is the static
  (left, right) of Problem.window_left/right, -1 = unbounded. Every kernel
  masks through this."""
  left, right = window
  visible = kj < kv_len
  if causal:
    visible = visible & (kj <= q_pos)
  if left >= 0:
    visible = visible & (kj >= q_pos - left)
  if right >= 0:
    visible = visible & (kj <= q_pos + right)
  if qseg is not None:
    visible = visible & (qseg == kvseg)
  return visible


def _kv_loops(table_ref, step, carry, window):
  """Runs ``step(j, carry, masked)`` over the kv blocks of this program's
  work-table row: [FIRST, FULL0) masked, [FULL0, N_FULL) unmasked, [N_FULL,
  N_BLOCKS) masked. Only a left window makes FIRST, FULL0 nonzero (plan.py),
  so without one the first loop is not generated (static branch)."""
  w = pl.program_id(0)
  n_full, n_blocks = table_ref[w, plan_lib.N_FULL], table_ref[w, plan_lib.N_BLOCKS]
  full0 = 0
  if window[0] >= 0:
    first, full0 = table_ref[w, plan_lib.FIRST], table_ref[w, plan_lib.FULL0]
    carry = jax.lax.fori_loop(first, full0, lambda j, c: step(j, c, True), carry)
  carry = jax.lax.fori_loop(full0, n_full, lambda j, c: step(j, c, False), carry)
  return jax.lax.fori_loop(n_full, n_blocks, lambda j, c: step(j, c, True), carry)


def _logits(q, k, *, scale, softcap, precision):
  """(base-2 logits [bq, bk] of q [bq, Dp] . k [bk, Dp], dS factor): s * log2 e
  with s = scale q.k, or with a soft cap c, c tanh(s / c) * log2 e and its
  1 - tanh^2 (None without a cap). tanh from exp2: exactly +-1 where it saturates."""
  s = _dot(q, k, trans_b=True, precision=precision)
  if softcap is None:
    return s * (scale * LOG2E), None
  t = 1.0 - 2.0 / (jnp.exp2(s * (2.0 * scale * LOG2E / softcap)) + 1.0)
  return t * (softcap * LOG2E), 1.0 - t * t


def forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs, scale: float,
                   softcap: float | None, causal: bool, window: tuple[int, int], has_segments: bool,
                   block_q: int, block_k: int, precision):
  if has_segments:
    qseg_ref, kvseg_ref, out_ref, lse_ref = refs
  else:
    out_ref, lse_ref = refs
  row0, q_pos0, kv_len = _work_row(table_ref)

  rows = pl.ds(row0, block_q)
  q = q_ref[rows, :]
  dp = q.shape[-1]
  q_pos = q_pos0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  qseg = qseg_ref[rows][:, None] if has_segments else None

  def step(j, carry, masked):
    acc, m_prev, l_prev = carry
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    # Logits in base 2: exp(x) == exp2(x * log2 e).
    s, _ = _logits(q, k, scale=scale, softcap=softcap, precision=precision)  # [bq, bk]
    if masked:
      kj = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      kvseg = kvseg_ref[keys][None, :] if has_segments else None
      visible = _visible(q_pos, kj, kv_len, causal=causal, window=window, qseg=qseg,
                         kvseg=kvseg)
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
  acc, m, l = _kv_loops(table_ref, step, carry, window)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out_ref[rows, :] = (acc / l_safe[:, None]).astype(out_ref.dtype)
  lse_ref[rows] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)


# ------------------------------------------------------------------ backward --
#
# All three take the cotangents on the padded q layout. ``lse2_ref`` holds
# lse * log2(e) with +inf on rows that must not contribute (lse = -inf, q-layout
# padding): exp2(s - inf) = 0, so such rows give P = 0 without a NaN.


def backward_delta_kernel(valid_ref, out_ref, dout_ref, lse_ref, dlse_ref,
                          delta_ref, lse2_ref):
  """One program per (q block, batch, q head).

  valid_ref: [bq] int32 (0 on padding rows); out_ref, dout_ref: [bq, Dp];
  lse_ref, dlse_ref: [bq] f32 -> delta_ref = rowsum(dO * O) - dlse: [bq] f32,
  lse2_ref: [bq] f32 (see above).
  """
  o = out_ref[...].astype(jnp.float32)
  do = dout_ref[...].astype(jnp.float32)
  delta_ref[...] = jnp.sum(o * do, axis=1) - dlse_ref[...]
  lse = lse_ref[...]
  keep = (valid_ref[...] != 0) & (lse != -jnp.inf)
  lse2_ref[...] = jnp.where(keep, lse * LOG2E, jnp.inf)


def _probs(q, k, lse2, *, scale, softcap, precision, visible=None):
  """(P = exp(S - lse) [bq, bk] f32 from q [bq, Dp], k [bk, Dp], lse2 [bq], the
  soft cap's dS factor or None: see _logits)."""
  s, cap_grad = _logits(q, k, scale=scale, softcap=softcap, precision=precision)
  p = jnp.exp2(s - lse2[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return p, cap_grad


def backward_dkdv_kernel(kv_table_ref, entries_ref, q_ref, k_ref, v_ref,
                         dout_ref, lse2_ref, delta_ref, *refs, scale: float,
                         softcap: float | None, causal: bool, window: tuple[int, int],
                         has_segments: bool,
                         group_size: int, block_q: int, block_k: int, precision):
  """One program per (kv block, batch, kv head): dK, dV of one kv block.

  kv_table_ref: [n_kv_blocks, KV_TABLE_WIDTH], entries_ref: [n_entries,
  ENTRY_WIDTH] int32 (plan.make_backward_plan); q_ref, dout_ref: [Tq_pad, G,
  Dp] (the G q heads of this kv head); k_ref, v_ref: [Tk_pad, Dp]; lse2_ref,
  delta_ref: [G, Tq_pad] f32; qseg_ref: [Tq_pad], kvseg_ref: [Tk_pad] int32
  (only with segments); dk_ref, dv_ref: [Tk_pad, Dp]. Sums over the G q heads
  and all entries in fp32 registers and writes the block once.
  """
  if has_segments:
    qseg_ref, kvseg_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  t = pl.program_id(0)
  kb = kv_table_ref[t, plan_lib.KV_BLOCK]
  start = kv_table_ref[t, plan_lib.KV_START]
  n_full = kv_table_ref[t, plan_lib.KV_N_FULL]
  n_entries = kv_table_ref[t, plan_lib.KV_N_ENTRIES]

  keys = pl.ds(kb * block_k, block_k)
  k = k_ref[keys, :]
  v = v_ref[keys, :]
  dp_ = k.shape[-1]
  kj = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  kvseg = kvseg_ref[keys][None, :] if has_segments else None

  def step(e, h, carry, masked):
    dk, dv = carry
    row0 = entries_ref[start + e, plan_lib.E_ROW0]
    rows = pl.ds(row0, block_q)
    q = q_ref[rows, h, :]
    do = dout_ref[rows, h, :]
    visible = None
    if masked:
      q_pos = (entries_ref[start + e, plan_lib.E_QPOS0]
               + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0))
      visible = _visible(q_pos, kj, entries_ref[start + e, plan_lib.E_KV_LEN],
                         causal=causal, window=window,
                         qseg=qseg_ref[rows][:, None] if has_segments else None,
                         kvseg=kvseg)
    p, cap_grad = _probs(q, k, lse2_ref[h, rows], scale=scale, softcap=softcap,
                         precision=precision, visible=visible)
    # dV += P^T dO; dS = P (dO V^T - delta); dK += dS^T Q (scale applied once).
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    dpv = _dot(do, v, trans_b=True, precision=precision)
    ds = p * (dpv - delta_ref[h, rows][:, None])
    if cap_grad is not None:   # through the cap: d(c tanh(x / c)) = (1 - tanh^2) dx
      ds = ds * cap_grad
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
    return dk, dv

  def head(h, carry):
    carry = jax.lax.fori_loop(0, n_full, lambda e, c: step(e, h, c, False), carry)
    return jax.lax.fori_loop(n_full, n_entries, lambda e, c: step(e, h, c, True), carry)

  carry = (jnp.zeros((block_k, dp_), jnp.float32),
           jnp.zeros((block_k, dp_), jnp.float32))
  dk, dv = jax.lax.fori_loop(0, group_size, head, carry)
  dk_ref[keys, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[keys, :] = dv.astype(dv_ref.dtype)


def backward_dq_kernel(table_ref, q_ref, k_ref, v_ref, dout_ref, lse2_ref,
                       delta_ref, *refs, scale: float, softcap: float | None, causal: bool,
                       window: tuple[int, int], has_segments: bool, block_q: int,
                       block_k: int, precision):
  """One program per (forward work row, batch, q head): dQ of one q block.

  table_ref: [n_work, TABLE_WIDTH] int32 (forward work table); q_ref,
  dout_ref: [Tq_pad, Dp]; k_ref, v_ref: [Tk_pad, Dp]; lse2_ref, delta_ref:
  [Tq_pad] f32; qseg_ref: [Tq_pad], kvseg_ref: [Tk_pad] int32 (only with
  segments); dq_ref: [Tq_pad, Dp].
  """
  if has_segments:
    qseg_ref, kvseg_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  row0, q_pos0, kv_len = _work_row(table_ref)

  rows = pl.ds(row0, block_q)
  q = q_ref[rows, :]
  do = dout_ref[rows, :]
  lse2 = lse2_ref[rows]
  delta = delta_ref[rows][:, None]
  q_pos = q_pos0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  qseg = qseg_ref[rows][:, None] if has_segments else None

  def step(j, dq, masked):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    v = v_ref[keys, :]
    visible = None
    if masked:
      kj = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      visible = _visible(q_pos, kj, kv_len, causal=causal, window=window, qseg=qseg,
                         kvseg=kvseg_ref[keys][None, :] if has_segments else None)
    p, cap_grad = _probs(q, k, lse2, scale=scale, softcap=softcap, precision=precision,
                         visible=visible)
    ds = p * (_dot(do, v, trans_b=True, precision=precision) - delta)
    if cap_grad is not None:
      ds = ds * cap_grad
    return dq + _dot(ds.astype(k.dtype), k, precision=precision)

  dq = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  dq = _kv_loops(table_ref, step, dq, window)
  dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)
