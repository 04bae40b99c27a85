"""Triton kernel bodies (no shapes, grids or launch logic here).

The forward mirrors ``jax_grouped_attn/pallas/kernels.py``: one program per (work-table row w,
batch * q head bh), grid ``(n_work, B * Hq)`` with axis 0 fastest.

Pointer arguments of :func:`forward_kernel` (padded layouts of plan.py):
  table_ptr: [n_work, TABLE_WIDTH] int32   forward work table
  q_ptr:     [B, Tq_pad, Hq, Dp]            k_ptr, v_ptr: [B, Tk_pad, Hk, Dp]
  qseg_ptr:  [B, Tq_pad] int32              kvseg_ptr: [B, Tk_pad] int32
             (read only if HAS_SEGMENTS; any int32 buffer otherwise)
  out_ptr:   [B, Tq_pad, Hq, Dp] q dtype    lse_ptr: [B, Hq, Tq_pad] float32
Strides are in elements and are constexprs (shapes are static under jit); the
last axis of every array is contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl

from jax_grouped_attn import plan as plan_lib

# Table columns and constants as constexprs (a kernel may only read constexpr
# globals).
ROW0 = tl.constexpr(plan_lib.ROW0)
QPOS0 = tl.constexpr(plan_lib.QPOS0)
KV_LEN = tl.constexpr(plan_lib.KV_LEN)
N_FULL = tl.constexpr(plan_lib.N_FULL)
N_BLOCKS = tl.constexpr(plan_lib.N_BLOCKS)
FIRST = tl.constexpr(plan_lib.FIRST)
FULL0 = tl.constexpr(plan_lib.FULL0)
TABLE_WIDTH = tl.constexpr(plan_lib.TABLE_WIDTH)
KV_BLOCK = tl.constexpr(plan_lib.KV_BLOCK)
KV_START = tl.constexpr(plan_lib.KV_START)
KV_N_FULL = tl.constexpr(plan_lib.KV_N_FULL)
KV_N_ENTRIES = tl.constexpr(plan_lib.KV_N_ENTRIES)
KV_TABLE_WIDTH = tl.constexpr(plan_lib.KV_TABLE_WIDTH)
E_ROW0 = tl.constexpr(plan_lib.E_ROW0)
E_QPOS0 = tl.constexpr(plan_lib.E_QPOS0)
E_KV_LEN = tl.constexpr(plan_lib.E_KV_LEN)
ENTRY_WIDTH = tl.constexpr(plan_lib.ENTRY_WIDTH)
LOG2E = tl.constexpr(plan_lib.LOG2E)
LN2 = tl.constexpr(plan_lib.LN2)


@triton.jit
def visible(q_pos, keys, kv_len, qseg, kvseg, CAUSAL: tl.constexpr,
            HAS_SEGMENTS: tl.constexpr, WINDOW_LEFT: tl.constexpr,
            WINDOW_RIGHT: tl.constexpr):
  """The mask rule of ``groups.py`` on broadcastable tiles: key ``keys`` is
  visible to a row at ``q_pos`` with prefix ``kv_len`` (and segments ``qseg``
  / ``kvseg``, read only if HAS_SEGMENTS; window ``[q_pos - WINDOW_LEFT,
  q_pos + WINDOW_RIGHT]``, -1 = that side unbounded). Every kernel masks
  through this."""
  seen = keys < kv_len
  if CAUSAL:
    seen = seen & (keys <= q_pos)
  if WINDOW_LEFT >= 0:
    seen = seen & (keys >= q_pos - WINDOW_LEFT)
  if WINDOW_RIGHT >= 0:
    seen = seen & (keys <= q_pos + WINDOW_RIGHT)
  if HAS_SEGMENTS:
    seen = seen & (qseg == kvseg)
  return seen


@triton.jit
def kv_walk(row_ptr, BLOCK_K: tl.constexpr, SK_T: tl.constexpr, WINDOW_LEFT: tl.constexpr):
  """The kv blocks a forward-table row visits: (first, full0, n_full,
  n_blocks) as in plan.py, and the shift (int64 elements of k/v; keys of the
  segment ids) of kv block ``first``. Only a left window skips leading
  blocks (FIRST = FULL0 = 0 otherwise): without one neither column is read
  and the shift is a constant 0."""
  n_full = tl.load(row_ptr + N_FULL)
  n_blocks = tl.load(row_ptr + N_BLOCKS)
  if WINDOW_LEFT >= 0:
    first = tl.load(row_ptr + FIRST)
    full0 = tl.load(row_ptr + FULL0)
    key_first = first * BLOCK_K
    kv_shift = key_first.to(tl.int64) * SK_T   # may pass 2^31
  else:
    first = 0
    full0 = 0
    key_first = 0
    kv_shift = 0
  return first, full0, n_full, n_blocks, kv_shift, key_first


@triton.jit
def walk_part(PART: tl.constexpr, first, full0, n_full, n_blocks):
  """Bounds of part PART of a walk: 0 [first, full0) and 2 [n_full,
  n_blocks) need the mask, 1 [full0, n_full) not. Kernels unroll
  ``tl.static_range(FIRST_PART, 3)``, FIRST_PART 1 without a left window."""
  lo = first if PART == 0 else (full0 if PART == 1 else n_full)
  hi = full0 if PART == 0 else (n_full if PART == 1 else n_blocks)
  return lo, hi


@triton.jit
def _tanh(x):
  """tanh from exp2: 1 - 2 / (e^2x + 1), which is exactly +-1 where e^2x over- or
  underflows (tl has no tanh on every Triton this runs with)."""
  return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def logits(raw, QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
  """(base-2 logits, tanh) of the dots ``raw`` = q.k: raw * scale * log2 e, or
  with a soft cap c = SOFTCAP > 0, c * tanh(raw * scale / c) * log2 e (Problem.
  softcap) and that tanh, whose 1 - tanh^2 the backward multiplies into dS.
  Without a cap the second value is ``raw`` (unused)."""
  if SOFTCAP > 0:
    t = _tanh(raw * (QK_SCALE / (SOFTCAP * LOG2E)))
    return t * (SOFTCAP * LOG2E), t
  else:
    return raw * QK_SCALE, raw


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, kvseg_ptrs, q_pos, qseg, kv_len,
                  key0, QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_SEGMENTS: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                  WINDOW_RIGHT: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
  """One online-softmax step over keys [key0, key0 + BLOCK_K).

  acc: [BLOCK_Q, Dp] f32, m_i / l_i: [BLOCK_Q] f32 running max (base 2) and sum;
  q: [BLOCK_Q, Dp]; k_ptrs / v_ptrs: [BLOCK_K, Dp] pointers of this kv block;
  kvseg_ptrs: [BLOCK_K] pointers; q_pos, qseg: [BLOCK_Q] int32.
  """
  k = tl.load(k_ptrs)
  # Logits in base 2: exp(x * scale) == exp2(x * scale * log2 e).
  s, _ = logits(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), QK_SCALE, SOFTCAP)
  if MASKED:
    keys = key0 + tl.arange(0, BLOCK_K)
    kvseg = tl.load(kvseg_ptrs) if HAS_SEGMENTS else keys
    seen = visible(q_pos[:, None], keys[None, :], kv_len, qseg[:, None], kvseg[None, :],
                   CAUSAL, HAS_SEGMENTS, WINDOW_LEFT, WINDOW_RIGHT)
    s = tl.where(seen, s, float("-inf"))
  m_new = tl.maximum(m_i, tl.max(s, 1))
  if MASKED:
    # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so
    # exp2(-inf - -inf) never makes NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
  else:
    m_use = m_new
  alpha = tl.math.exp2(m_i - m_use)
  p = tl.math.exp2(s - m_use[:, None])
  l_new = l_i * alpha + tl.sum(p, 1)
  v = tl.load(v_ptrs)
  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
  return acc, m_new, l_new


@triton.jit
def forward_kernel(table_ptr, q_ptr, k_ptr, v_ptr, qseg_ptr, kvseg_ptr, out_ptr, lse_ptr,
                   QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HQ: tl.constexpr,
                   GROUP_SIZE: tl.constexpr,
                   SQ_B: tl.constexpr, SQ_T: tl.constexpr, SQ_H: tl.constexpr,
                   SK_B: tl.constexpr, SK_T: tl.constexpr, SK_H: tl.constexpr,
                   SL_B: tl.constexpr, SL_H: tl.constexpr,
                   SSQ_B: tl.constexpr, SSK_B: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
  """Grouped flash-attention forward of one q block of one (batch, q head).

  QK_SCALE = softmax scale * log2(e); SOFTCAP: the soft cap c (0.0: none).
  Strides: SQ_* of q and out, SK_* of k and v, SL_* of lse, SSQ_B / SSK_B of
  the segment ids (batch axis).
  WINDOW_LEFT / WINDOW_RIGHT: Problem.window_left / window_right (-1 = unbounded).
  """
  w = tl.program_id(0)
  bh = tl.program_id(1)
  # int64 bases: B * T * H * Dp may exceed 2^31 elements.
  b = (bh // HQ).to(tl.int64)
  h = (bh % HQ).to(tl.int64)
  hk = h // GROUP_SIZE
  row_ptr = table_ptr + w * TABLE_WIDTH
  row0 = tl.load(row_ptr + ROW0)
  q_pos0 = tl.load(row_ptr + QPOS0)
  kv_len = tl.load(row_ptr + KV_LEN)
  first, full0, n_full, n_blocks, kv_shift, key_first = kv_walk(row_ptr, BLOCK_K, SK_T,
                                                                WINDOW_LEFT)

  offs_q = tl.arange(0, BLOCK_Q)
  offs_k = tl.arange(0, BLOCK_K)
  offs_d = tl.arange(0, DP)
  q_off = b * SQ_B + h * SQ_H + row0.to(tl.int64) * SQ_T
  q = tl.load(q_ptr + q_off + offs_q[:, None] * SQ_T + offs_d[None, :])
  q_pos = q_pos0 + offs_q
  if HAS_SEGMENTS:
    qseg = tl.load(qseg_ptr + b * SSQ_B + row0 + offs_q)
  else:
    qseg = offs_q  # unused
  # k, v and kv segment pointers start at kv block ``first``.
  kv_off = b * SK_B + hk * SK_H + kv_shift
  kvseg_ptrs = kvseg_ptr + b * SSK_B + key_first + offs_k
  tile = offs_k[:, None] * SK_T + offs_d[None, :]
  k_ptrs = k_ptr + kv_off + tile
  v_ptrs = v_ptr + kv_off + tile

  acc = tl.zeros([BLOCK_Q, DP], dtype=tl.float32)
  m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
  l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
  # The walk's parts in order (walk_part); pointers advance one block a step.
  for part in tl.static_range(0 if WINDOW_LEFT >= 0 else 1, 3):
    lo, hi = walk_part(part, first, full0, n_full, n_blocks)
    for j in range(lo, hi):
      acc, m_i, l_i = _attend_block(
          acc, m_i, l_i, q, k_ptrs, v_ptrs, kvseg_ptrs, q_pos, qseg, kv_len,
          j * BLOCK_K, QK_SCALE, SOFTCAP, CAUSAL, HAS_SEGMENTS, WINDOW_LEFT, WINDOW_RIGHT,
          part != 1, BLOCK_K, DOT_PRECISION)
      k_ptrs += BLOCK_K * SK_T
      v_ptrs += BLOCK_K * SK_T
      kvseg_ptrs += BLOCK_K

  # Rows that saw no key: l == 0, out = 0, lse = -inf.
  seen = l_i > 0.0
  l_safe = tl.where(seen, l_i, 1.0)
  out = acc / l_safe[:, None]
  lse = tl.where(seen, m_i * LN2 + tl.log(l_safe), float("-inf"))
  tl.store(out_ptr + q_off + offs_q[:, None] * SQ_T + offs_d[None, :],
           out.to(out_ptr.dtype.element_ty))
  tl.store(lse_ptr + b * SL_B + h * SL_H + row0 + offs_q, lse)


# ---------------------------------------------------------------- backward ---
#
# Three kernels, each launched once for all groups (see ``launch.py``):
#   delta_kernel: grid (Tq_pad / BLOCK_Q, B * Hq)
#   dkdv_kernel:  grid (n_kv_blocks, B * Hk)   kv table of plan.make_backward_plan
#   dq_kernel:    grid (n_work, B * Hq)        forward work table of plan.make_plan
#
# Pointer arguments (padded layouts of plan.py, last axis contiguous):
#   q_ptr, out_ptr, dout_ptr, dq_ptr: [B, Tq_pad, Hq, Dp]
#   k_ptr, v_ptr, dk_ptr, dv_ptr:     [B, Tk_pad, Hk, Dp]
#   lse_ptr, dlse_ptr, delta_ptr, lse2_ptr: [B, Hq, Tq_pad] float32
#   valid_ptr: [Tq_pad] int32 (0 on padding rows)
#   qseg_ptr: [B, Tq_pad], kvseg_ptr: [B, Tk_pad] int32 (read only if HAS_SEGMENTS)
# ``lse2`` is lse * log2(e) with +inf on rows that must not contribute (lse =
# -inf, padding rows): exp2(s - inf) = 0 gives P = 0 there without a NaN.
# Strides are constexprs in elements, named as in the forward's; so are
# WINDOW_LEFT / WINDOW_RIGHT (Problem.window_left / window_right, -1 = unbounded).


@triton.jit
def delta_kernel(valid_ptr, out_ptr, dout_ptr, lse_ptr, dlse_ptr, delta_ptr, lse2_ptr,
                 HQ: tl.constexpr, SQ_B: tl.constexpr, SQ_T: tl.constexpr,
                 SQ_H: tl.constexpr, SL_B: tl.constexpr, SL_H: tl.constexpr,
                 BLOCK_Q: tl.constexpr, DP: tl.constexpr):
  """delta = rowsum(dO * O) - dlse and lse2 for one q block of one (batch, q head)."""
  i = tl.program_id(0)
  bh = tl.program_id(1)
  b = (bh // HQ).to(tl.int64)
  h = (bh % HQ).to(tl.int64)
  rows = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
  offs_d = tl.arange(0, DP)
  tile = b * SQ_B + h * SQ_H + rows[:, None].to(tl.int64) * SQ_T + offs_d[None, :]
  o = tl.load(out_ptr + tile).to(tl.float32)
  do = tl.load(dout_ptr + tile).to(tl.float32)
  vec = b * SL_B + h * SL_H + rows
  lse = tl.load(lse_ptr + vec)
  tl.store(delta_ptr + vec, tl.sum(o * do, 1) - tl.load(dlse_ptr + vec))
  keep = (tl.load(valid_ptr + rows) != 0) & (lse != float("-inf"))
  tl.store(lse2_ptr + vec, tl.where(keep, lse * LOG2E, float("inf")))


@triton.jit
def _dkdv_step(dk, dv, k, v, keys, kvseg, entry_ptr, q_base, do_base, lse2_base, delta_base,
               qseg_base, QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
               SQ_T: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SEGMENTS: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, MASKED: tl.constexpr, BLOCK_Q: tl.constexpr,
               DP: tl.constexpr, DOT_PRECISION: tl.constexpr):
  """Adds one q block's share to dk, dv: [BLOCK_K, Dp] f32.

  k, v: [BLOCK_K, Dp]; keys, kvseg: [BLOCK_K] int32; entry_ptr: this entry's
  row of the entry table; q_base, do_base: q / dout pointers of (batch, head)
  at row 0; lse2_base, delta_base: lse2 / delta of (batch, head) at row 0;
  qseg_base: q segment ids of this batch at row 0.
  Transposed tiles (keys x rows) avoid transposing computed values.
  """
  row0 = tl.load(entry_ptr + E_ROW0)
  offs_q = tl.arange(0, BLOCK_Q)
  offs_d = tl.arange(0, DP)
  rows = row0 + offs_q
  qt = tl.load(q_base + offs_d[:, None] + rows[None, :].to(tl.int64) * SQ_T)   # [Dp, BQ]
  do = tl.load(do_base + rows[:, None].to(tl.int64) * SQ_T + offs_d[None, :])  # [BQ, Dp]
  lse2 = tl.load(lse2_base + rows)
  delta = tl.load(delta_base + rows)
  st, tt = logits(tl.dot(k, qt, input_precision=DOT_PRECISION), QK_SCALE, SOFTCAP)  # [BK, BQ]
  pt = tl.math.exp2(st - lse2[None, :])
  if MASKED:
    q_pos = tl.load(entry_ptr + E_QPOS0) + offs_q
    qseg = tl.load(qseg_base + rows) if HAS_SEGMENTS else q_pos
    seen = visible(q_pos[None, :], keys[:, None], tl.load(entry_ptr + E_KV_LEN),
                   qseg[None, :], kvseg[:, None], CAUSAL, HAS_SEGMENTS, WINDOW_LEFT,
                   WINDOW_RIGHT)
    pt = tl.where(seen, pt, 0.0)
  # dV += P^T dO; dS^T = P^T (V dO^T - delta); dK += dS^T Q (scale applied once).
  dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
  dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
  dst = pt * (dpt - delta[None, :])
  if SOFTCAP > 0:   # through the cap: d(c tanh(x / c)) = (1 - tanh^2) dx
    dst = dst * (1.0 - tt * tt)
  dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
  return dk, dv


@triton.jit
def dkdv_kernel(kv_table_ptr, entries_ptr, q_ptr, k_ptr, v_ptr, dout_ptr, lse2_ptr,
                delta_ptr, qseg_ptr, kvseg_ptr, dk_ptr, dv_ptr,
                QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
                HK: tl.constexpr,
                GROUP_SIZE: tl.constexpr,
                SQ_B: tl.constexpr, SQ_T: tl.constexpr, SQ_H: tl.constexpr,
                SK_B: tl.constexpr, SK_T: tl.constexpr, SK_H: tl.constexpr,
                SL_B: tl.constexpr, SL_H: tl.constexpr,
                SSQ_B: tl.constexpr, SSK_B: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
  """dK, dV of one kv block of one (batch, kv head), summed over its
  GROUP_SIZE q heads and every q block (of any group) that sees it; fp32
  accumulators, one write, no atomics."""
  t = tl.program_id(0)
  bh = tl.program_id(1)
  b = (bh // HK).to(tl.int64)
  hk = (bh % HK).to(tl.int64)
  row_ptr = kv_table_ptr + t * KV_TABLE_WIDTH
  kb = tl.load(row_ptr + KV_BLOCK)
  start = tl.load(row_ptr + KV_START)
  n_full = tl.load(row_ptr + KV_N_FULL)
  n_entries = tl.load(row_ptr + KV_N_ENTRIES)

  offs_k = tl.arange(0, BLOCK_K)
  offs_d = tl.arange(0, DP)
  keys = kb * BLOCK_K + offs_k
  tile = b * SK_B + hk * SK_H + keys[:, None].to(tl.int64) * SK_T + offs_d[None, :]
  k = tl.load(k_ptr + tile)
  v = tl.load(v_ptr + tile)
  if HAS_SEGMENTS:
    kvseg = tl.load(kvseg_ptr + b * SSK_B + keys)
  else:
    kvseg = keys  # unused
  qseg_base = qseg_ptr + b * SSQ_B

  dk = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
  dv = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
  for g in range(0, GROUP_SIZE):
    h = hk * GROUP_SIZE + g
    q_base = q_ptr + b * SQ_B + h * SQ_H
    do_base = dout_ptr + b * SQ_B + h * SQ_H
    lse2_base = lse2_ptr + b * SL_B + h * SL_H
    delta_base = delta_ptr + b * SL_B + h * SL_H
    for e in range(start, start + n_full):
      dk, dv = _dkdv_step(dk, dv, k, v, keys, kvseg, entries_ptr + e * ENTRY_WIDTH,
                          q_base, do_base, lse2_base, delta_base, qseg_base, QK_SCALE,
                          SOFTCAP, SQ_T, CAUSAL,
                          HAS_SEGMENTS, WINDOW_LEFT, WINDOW_RIGHT, False, BLOCK_Q, DP,
                          DOT_PRECISION)
    for e in range(start + n_full, start + n_entries):
      dk, dv = _dkdv_step(dk, dv, k, v, keys, kvseg, entries_ptr + e * ENTRY_WIDTH,
                          q_base, do_base, lse2_base, delta_base, qseg_base, QK_SCALE,
                          SOFTCAP, SQ_T, CAUSAL,
                          HAS_SEGMENTS, WINDOW_LEFT, WINDOW_RIGHT, True, BLOCK_Q, DP,
                          DOT_PRECISION)
  tl.store(dk_ptr + tile, (dk * SCALE).to(dk_ptr.dtype.element_ty))
  tl.store(dv_ptr + tile, dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, q_pos, qseg, kv_len, kt_ptrs, vt_ptrs, kvseg_ptrs,
             key0, QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_SEGMENTS: tl.constexpr, WINDOW_LEFT: tl.constexpr,
             WINDOW_RIGHT: tl.constexpr, MASKED: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
  """Adds keys [key0, key0 + BLOCK_K) to dq: [BLOCK_Q, Dp] f32.

  q, do: [BLOCK_Q, Dp]; lse2, delta, q_pos, qseg: [BLOCK_Q]; kt_ptrs /
  vt_ptrs: [Dp, BLOCK_K] pointers (transposed tiles); kvseg_ptrs: [BLOCK_K].
  """
  kt = tl.load(kt_ptrs)
  s, t = logits(tl.dot(q, kt, input_precision=DOT_PRECISION), QK_SCALE, SOFTCAP)  # [BQ, BK]
  p = tl.math.exp2(s - lse2[:, None])
  if MASKED:
    keys = key0 + tl.arange(0, BLOCK_K)
    kvseg = tl.load(kvseg_ptrs) if HAS_SEGMENTS else keys
    seen = visible(q_pos[:, None], keys[None, :], kv_len, qseg[:, None], kvseg[None, :],
                   CAUSAL, HAS_SEGMENTS, WINDOW_LEFT, WINDOW_RIGHT)
    p = tl.where(seen, p, 0.0)
  vt = tl.load(vt_ptrs)
  dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
  ds = p * (dp - delta[:, None])
  if SOFTCAP > 0:   # through the cap: d(c tanh(x / c)) = (1 - tanh^2) dx
    ds = ds * (1.0 - t * t)
  return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)


@triton.jit
def dq_kernel(table_ptr, q_ptr, k_ptr, v_ptr, dout_ptr, lse2_ptr, delta_ptr, qseg_ptr,
              kvseg_ptr, dq_ptr,
              QK_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
              HQ: tl.constexpr,
              GROUP_SIZE: tl.constexpr,
              SQ_B: tl.constexpr, SQ_T: tl.constexpr, SQ_H: tl.constexpr,
              SK_B: tl.constexpr, SK_T: tl.constexpr, SK_H: tl.constexpr,
              SL_B: tl.constexpr, SL_H: tl.constexpr,
              SSQ_B: tl.constexpr, SSK_B: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
  """dQ of one q block (forward work-table row) of one (batch, q head)."""
  w = tl.program_id(0)
  bh = tl.program_id(1)
  b = (bh // HQ).to(tl.int64)
  h = (bh % HQ).to(tl.int64)
  hk = h // GROUP_SIZE
  row_ptr = table_ptr + w * TABLE_WIDTH
  row0 = tl.load(row_ptr + ROW0)
  q_pos0 = tl.load(row_ptr + QPOS0)
  kv_len = tl.load(row_ptr + KV_LEN)
  first, full0, n_full, n_blocks, kv_shift, key_first = kv_walk(row_ptr, BLOCK_K, SK_T,
                                                                WINDOW_LEFT)

  offs_q = tl.arange(0, BLOCK_Q)
  offs_k = tl.arange(0, BLOCK_K)
  offs_d = tl.arange(0, DP)
  rows = row0 + offs_q
  tile = b * SQ_B + h * SQ_H + rows[:, None].to(tl.int64) * SQ_T + offs_d[None, :]
  q = tl.load(q_ptr + tile)
  do = tl.load(dout_ptr + tile)
  l_off = b * SL_B + h * SL_H + rows
  lse2 = tl.load(lse2_ptr + l_off)
  delta = tl.load(delta_ptr + l_off)
  q_pos = q_pos0 + offs_q
  if HAS_SEGMENTS:
    qseg = tl.load(qseg_ptr + b * SSQ_B + rows)
  else:
    qseg = offs_q  # unused
  # k, v and kv segment pointers start at kv block ``first`` (kv_walk).
  kv_off = b * SK_B + hk * SK_H + kv_shift
  kvseg_ptrs = kvseg_ptr + b * SSK_B + key_first + offs_k
  tile_t = kv_off + offs_d[:, None] + offs_k[None, :] * SK_T
  kt_ptrs = k_ptr + tile_t
  vt_ptrs = v_ptr + tile_t

  dq = tl.zeros([BLOCK_Q, DP], dtype=tl.float32)
  # The forward's walk (walk_part); pointers advance one block a step.
  for part in tl.static_range(0 if WINDOW_LEFT >= 0 else 1, 3):
    lo, hi = walk_part(part, first, full0, n_full, n_blocks)
    for j in range(lo, hi):
      dq = _dq_step(dq, q, do, lse2, delta, q_pos, qseg, kv_len, kt_ptrs, vt_ptrs, kvseg_ptrs,
                    j * BLOCK_K, QK_SCALE, SOFTCAP, CAUSAL, HAS_SEGMENTS, WINDOW_LEFT,
                    WINDOW_RIGHT, part != 1, BLOCK_K, DOT_PRECISION)
      kt_ptrs += BLOCK_K * SK_T
      vt_ptrs += BLOCK_K * SK_T
      kvseg_ptrs += BLOCK_K
  tl.store(dq_ptr + tile, (dq * SCALE).to(dq_ptr.dtype.element_ty))
