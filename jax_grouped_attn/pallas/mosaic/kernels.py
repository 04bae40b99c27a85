"""Mosaic GPU kernel bodies (no shapes, grids or launch logic here).

Every kernel is warp-specialised: ``wgs`` compute warpgroups (wgmma + softmax)
and one memory warpgroup (index ``wgs``) that streams tiles with TMA into a
``stages``-deep shared-memory ring. Ready barriers (one arrival: the TMA)
say a slot is full; free barriers (``wgs`` arrivals) say every compute
warpgroup is done with it. Grid axes are named; ``wg`` is the warpgroup.

Forward refs (GMEM, padded layouts of plan.py; Dqk and Dv multiples of 64):
  table_ref: [n_work, TABLE_WIDTH] int32   forward work table
  q_ref:     [B, Tq_pad, Hq, Dqk]          k_ref: [B, Tk_pad, Hk, Dqk]
  v_ref:     [B, Tk_pad, Hk, Dv]
  qseg_ref:  [B, Tq_pad] int32, kvseg_ref: [B, Tk_pad] int32  (with segments)
  out_ref:   [B, Tq_pad, Hq, Dv]           lse_ref: [B, Hq, Tq_pad] float32

A tile stored as column parts (a tuple of shared-memory refs, [..., rows,
width_i]) is contracted part by part (:func:`_contract`) and loaded by one
TMA per part on one barrier (:func:`_load_parts`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_grouped_attn import compat, plan as plan_lib
from jax_grouped_attn.pallas.mosaic.config import DQ_SHARE, fused_dq_split
from jax_grouped_attn.plan import LN2, LOG2E

NEG_INF = float("-inf")

# Registers per thread after setmaxnreg: the compute warpgroups grow, the
# memory warpgroup (it issues TMA, and in the ordered mode adds dQ) shrinks.
# Multiples of 8, at most 240 to grow to; (2 x 232 + 40) x 128 threads = 64512
# of the SM's 65536. The fused backward holds dK, dV, a dQ share and dS per
# compute thread (spills at 232 by devtools/mosaic_ptxas.py: 112 B against
# 56 B at 240), and its memory warps fit 24 (no spills).
REGISTERS = {   # budget: (compute, memory)
    "one_compute": (240, 40),
    "two_compute": (232, 40),
    "fused": (240, 24),
}


def register_budget(wgs: int, fused_dq: bool = False) -> str:
  """The REGISTERS key of a kernel with ``wgs`` compute warpgroups."""
  return "fused" if fused_dq else ("one_compute" if wgs == 1 else "two_compute")


def _compute_registers(budget: str):
  plgpu.set_max_registers(REGISTERS[budget][0], action="increase")


def _memory_registers(budget: str):
  plgpu.set_max_registers(REGISTERS[budget][1], action="decrease")

_load = compat.mosaic_load   # ref[...] into registers with a layout


def _t(ref):
  """The transposed view of a 2-D shared-memory ref (a wgmma operand)."""
  return ref.transpose((1, 0))


def _row_vec(x, shape):
  """[rows] (WGMMA.reduce(1)) -> [rows, cols] broadcast along columns."""
  return lax.broadcast_in_dim(x, shape, [0])


def _col_vec(x, shape):
  """[cols] (WGMMA.reduce(0)) -> [rows, cols] broadcast along rows."""
  return lax.broadcast_in_dim(x, shape, [1])


def _visible(q_pos0, k0, kv_len, shape, *, causal, window=(-1, -1), qseg=None, kvseg=None,
             transposed: bool = False):
  """The mask rule of ``groups.py`` on a WGMMA tile; every kernel masks through this.

  [rows, cols] bool: row r (position q_pos0 + r) sees key k0 + c; with
  ``transposed``, [keys, rows]: key k0 + r is seen by row q_pos0 + c.
  window: static (left, right) of Problem.window_left/right, -1 = unbounded.
  qseg / kvseg: the tile's row / key segment ids (reduced layouts), or None.
  """
  left, right = window
  row_axis, key_axis = (1, 0) if transposed else (0, 1)
  pos = plgpu.broadcasted_iota(jnp.int32, shape, row_axis, layout=plgpu.Layout.WGMMA) + q_pos0
  kj = plgpu.broadcasted_iota(jnp.int32, shape, key_axis, layout=plgpu.Layout.WGMMA) + k0
  seen = kj < kv_len
  if causal:
    seen = seen & (kj <= pos)
  if left >= 0:
    seen = seen & (kj >= pos - left)
  if right >= 0:
    seen = seen & (kj <= pos + right)
  if qseg is not None:
    along = (_col_vec, _row_vec) if transposed else (_row_vec, _col_vec)
    seen = seen & (along[0](qseg, shape) == along[1](kvseg, shape))
  return seen


def _part_cols(parts, i: int):
  """The GMEM columns of part i of a tile stored as ``parts`` (refs [..., width])."""
  return pl.ds(sum(r.shape[-1] for r in parts[:i]), parts[i].shape[-1])


def _load_parts(view, parts, barrier):
  """TMA of a tile into its column parts: ``view(cols)`` is the GMEM view of
  columns ``cols`` (None: all of them); one arrival on ``barrier`` per part."""
  if len(parts) == 1:
    plgpu.copy_gmem_to_smem(view(None), parts[0], barrier)
    return
  for i, part in enumerate(parts):
    plgpu.copy_gmem_to_smem(view(_part_cols(parts, i)), part, barrier)


def _contract(acc_ref, a_parts, b_parts):
  """acc += sum_i a_i b_i^T: a product over the columns of two tiles stored
  in matching column parts."""
  for a, b in zip(a_parts, b_parts, strict=True):
    plgpu.wgmma(acc_ref, a, _t(b))


def _gmem(ref, *idx):
  """The ``view`` of :func:`_load_parts` for ``ref.at[idx]`` (head_dim last)."""
  return lambda cols: ref.at[idx] if cols is None else ref.at[(*idx, cols)]


def _opaque_zero(i):
  """0 from the loop index i, in a form LLVM cannot fold: i (i + 1) is even.

  A tile read the same way on every step (K, V in the dK/dV kernel) has wgmma
  descriptors (a 64-bit register pair per 16-wide k-step) that LLVM hoists out
  of the loop; dozens of them outlive the 232 registers and spill (100 B of
  spill stores in the dK/dV kernel at D128, 432 B in the fused one;
  devtools/mosaic_ptxas.py). Indexed ``[base + _opaque_zero(i)]`` they are
  rebuilt on each step instead."""
  return lax.bitwise_and(i * (i + 1), 1)


def _logits(s, scale: float, softcap: float | None):
  """Raw scores s = q.k as (x, c, t): c * x are the base-2 logits. Without a cap
  x = s and c = scale * log2(e), t None; with a soft cap (Problem.softcap)
  x = t = tanh(s * scale / softcap) and c = softcap * log2(e) > 0: dS then
  carries 1 - t^2. Every kernel scores its tiles through this."""
  if softcap is None:
    return s, scale * LOG2E, None
  t = jnp.tanh(s * (scale / softcap))
  return t, softcap * LOG2E, t


class _KvBlocks:
  """The kv blocks a work-table row visits, as both sides of a ring walk them.

  Blocks [FIRST, N_BLOCKS) stream through the ``stages`` ring in order, block
  j in slot (j - FIRST) % stages: the memory warpgroup loads i-th block
  ``block(i)`` into slot i % stages and the compute warpgroups wait for the
  same slots, so the barrier counts of both agree. Only a left window makes
  FIRST (and FULL0) nonzero (plan.py), so without one this is a static
  Python branch that emits the same ops as walking [0, N_BLOCKS).
  """

  def __init__(self, table_ref, w, window, stages: int):
    self.late = window[0] >= 0
    self.stages = stages
    self.n_full = table_ref[w, plan_lib.N_FULL]
    self.n_blocks = table_ref[w, plan_lib.N_BLOCKS]
    if self.late:
      self.first = table_ref[w, plan_lib.FIRST]
      self.full0 = table_ref[w, plan_lib.FULL0]
      self.n_steps = self.n_blocks - self.first
    else:
      self.first = self.full0 = 0
      self.n_steps = self.n_blocks

  def block(self, i):
    """The i-th block streamed."""
    return self.first + i if self.late else i

  def slot(self, j):
    """The ring slot of block j."""
    return lax.rem(j - self.first if self.late else j, self.stages)

  def key0(self, j, block_kv: int):
    """First key of block j, for TMA slices. With FIRST read from the table,
    say that it is a whole number of blocks (as ROW0 is, notes/mosaic.md)."""
    return pl.multiple_of(j * block_kv, block_kv) if self.late else j * block_kv

  def stream(self, load, max_blocks: int):
    """The memory warpgroup's side: ``load(block, slot, wait_free)`` of block
    ``block(i)`` into slot i % stages; the first ``stages`` (at most
    ``max_blocks``, a static bound) need not wait for a free slot."""
    for i in range(min(self.stages, max_blocks)):
      pl.when(i < self.n_steps)(lambda i=i: load(self.block(i), i, False))

    @pl.loop(0, self.n_steps - self.stages)
    def _(j):
      load(self.block(j + self.stages), lax.rem(j, self.stages), True)

  def walk(self, step, carry, after_first: bool = False):
    """step(j, carry, masked) over [FIRST, FULL0) masked, [FULL0, N_FULL)
    unmasked, [N_FULL, N_BLOCKS) masked; with ``after_first``, from FIRST + 1."""
    lo = (lambda b: jnp.maximum(b, self.first + 1)) if after_first else (lambda b: b)
    if self.late:
      carry = lax.fori_loop(lo(self.first), self.full0, lambda j, c: step(j, c, True), carry)
    carry = lax.fori_loop(lo(self.full0), self.n_full, lambda j, c: step(j, c, False), carry)
    return lax.fori_loop(lo(self.n_full), self.n_blocks, lambda j, c: step(j, c, True), carry)


# One kernel: its warpgroup roles are branches over shared buffers (splitting
# them apart would hide which role touches what), hence its complexity.
def forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs,  # noqa: C901
                   scale: float, softcap: float | None, causal: bool,
                   window: tuple[int, int], has_segments: bool, block_q: int, block_kv: int,
                   stages: int, wgs: int, group_size: int, overlap: bool = False):
  """One CTA per (q head, work row, batch): rows [ROW0, ROW0 + wgs * block_q).

  Compute warpgroup i owns rows ROW0 + i * block_q + [0, block_q). All
  warpgroups walk the same kv blocks (_KvBlocks): [FIRST, FULL0) masked,
  [FULL0, N_FULL) without a mask, then [N_FULL, N_BLOCKS) masked; FIRST =
  FULL0 = 0 without a left window. Scratch (after out_ref, lse_ref):
    ``smem`` (launch.forward names it): q, a tuple of column parts [wgs,
    block_q, w_i] (Q in; O out into q[0], Dv wide, unless there is an ``o``
    [wgs, block_q, Dv]), k, parts [stages, block_kv, w_i] like q's, v
    [stages, block_kv, Dv], lse [wgs, block_q] f32; ``bars`` q_ready and
    k_ready (one arrival per part), v_ready, k_free, v_free, sched.

  overlap (MosaicForwardConfig.overlap): step j issues S_j = Q K_j^T and
  O += P_{j-1} V_{j-1} together, waits for S_j only, and runs block j's
  softmax while PV runs; the first block's QK^T and the last block's PV are
  peeled off.
  """
  if has_segments:
    qseg_ref, kvseg_ref, out_ref, lse_ref, smem, bars = refs
  else:
    qseg_ref = kvseg_ref = None
    out_ref, lse_ref, smem, bars = refs
  q_parts, k_parts, v_smem, lse_smem = smem["q"], smem["k"], smem["v"], smem["lse"]
  q_ready, k_ready, v_ready = bars["q_ready"], bars["k_ready"], bars["v_ready"]
  k_free, v_free, sched = bars["k_free"], bars["v_free"], bars["sched"]
  dtype = q_ref.dtype
  dv = v_ref.shape[-1]

  h = lax.axis_index("h")
  w = lax.axis_index("w")
  b = lax.axis_index("b")
  wg = lax.axis_index("wg")
  # Rows start on whole blocks (plan.py): say so, TMA slices need it proven.
  row0 = pl.multiple_of(table_ref[w, plan_lib.ROW0], block_q)
  q_pos0 = table_ref[w, plan_lib.QPOS0]
  kv_len = table_ref[w, plan_lib.KV_LEN]
  blocks = _KvBlocks(table_ref, w, window, stages)
  n_blocks = blocks.n_blocks

  shape_s = (block_q, block_kv)

  def pingpong():
    # Two compute warpgroups take turns on the tensor cores: one runs its
    # softmax while the other's matmuls run.
    if wgs > 1:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg < wgs)
  def _compute():  # noqa: C901 -- two walks (plain, overlapped) over one role's buffers
    _compute_registers(register_budget(wgs))
    q_tiles = tuple(part.at[wg] for part in q_parts)
    o_smem = smem["o"].at[wg] if "o" in smem else q_tiles[0]   # [block_q, Dv]
    my_row0 = pl.multiple_of(row0 + wg * block_q, block_q)
    my_pos0 = q_pos0 + wg * block_q
    _load_parts(_gmem(q_ref, b, pl.ds(my_row0, block_q), h), q_tiles, q_ready.at[wg])
    qseg = None
    if has_segments:
      qseg = _load(qseg_ref.at[b, pl.ds(my_row0, block_q)], plgpu.Layout.WGMMA.reduce(1))
    m0 = plgpu.layout_cast(jnp.full((block_q,), NEG_INF, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))
    l0 = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc0 = plgpu.layout_cast(jnp.full((block_q, dv), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_ready.at[wg])

    def softmax(s, m, l, j, masked: bool, cast: bool = True):
      """Online softmax of S_j: (P_j in dtype, or fp32 without ``cast``, m, l,
      alpha) with l rescaled."""
      # Logits go to base 2 inside exp2's FMA: p = exp2(s * cc - m), m in base-2 units.
      s, cc, _ = _logits(s, scale, softcap)
      if cc < 0:   # keep max() exact for a negative scale
        s, cc = s * cc, 1.0
      if masked:
        kvseg = None
        if has_segments:
          kvseg = _load(kvseg_ref.at[b, pl.ds(j * block_kv, block_kv)],
                        plgpu.Layout.WGMMA.reduce(0))
        vis = _visible(my_pos0, j * block_kv, kv_len, shape_s, causal=causal, window=window,
                       qseg=qseg, kvseg=kvseg)
        s = jnp.where(vis, s, NEG_INF)
      m_new = jnp.maximum(m, s.max(axis=1) * cc)
      # A row that has seen no key keeps m = -inf: subtract 0 instead, so
      # exp2(-inf - -inf) never makes a NaN (p and alpha are then 0).
      m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s * cc - _row_vec(m_use, shape_s))
      l = l * alpha + p.sum(axis=1)
      return (p.astype(dtype) if cast else p), m_new, l, alpha

    def finish(acc, m, l):
      seen = l > 0.0
      l_safe = jnp.where(seen, l, 1.0)
      out = acc * _row_vec(1.0 / l_safe, acc.shape)
      o_smem[...] = out.astype(dtype)
      lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, NEG_INF)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(my_row0, block_q), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(my_row0, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(blocks.n_steps > 0)
    def _():   # block FIRST is in slot 0
      plgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(pingpong)

    def scores(slot):
      """S = Q K^T of the K tile in ``slot`` (the other warpgroup's turn
      begins once it is issued), then that slot is freed."""
      def qk(s_ref):
        _contract(s_ref, q_tiles, _at(k_parts, slot))
        pingpong()
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC(shape_s, jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      return s

    def step(j, carry, masked: bool):
      acc, m, l = carry
      slot = blocks.slot(j)
      p16, m_new, l, alpha = softmax(scores(slot), m, l, j, masked)
      acc = acc * _row_vec(alpha, acc.shape)
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      if wgs > 1:
        plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_ready.at[slot])
      if wgs > 1:
        plgpu.barrier_wait(sched)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        @pl.when(j + 1 < n_blocks)
        def _():   # wait for the next K while this wgmma runs
          plgpu.barrier_wait(k_ready.at[blocks.slot(j + 1)])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    def overlapped_walk():
      j0 = blocks.first
      p16, m, l, _ = softmax(scores(blocks.slot(j0)), m0, l0, j0, True)   # may be masked
      pingpong()

      def step2(j, carry, masked: bool):
        acc, m, l, p16 = carry   # p16: block j - 1's probabilities
        slot, prev = blocks.slot(j), blocks.slot(j - 1)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[prev])

        def body(refs):
          acc_ref, s_ref, p_ref, m_ref, l_ref, alpha_ref = refs
          _contract(s_ref, q_tiles, _at(k_parts, slot))           # S_j
          plgpu.wgmma(acc_ref, p16, v_smem.at[prev])              # O += P_{j-1} V_{j-1}
          pingpong()
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)       # S_j; PV still runs
          plgpu.barrier_arrive(k_free.at[slot])
          p, m_ref[...], l_ref[...], alpha_ref[...] = softmax(s, m, l, j, masked, cast=False)
          # P_j's bf16 registers (the next PV's A operand) are written only
          # once PV_{j-1} is done: written while a wgmma is in flight, ptxas
          # serializes every wgmma (its note C7513; run 8's 0.63x).
          plgpu.wgmma_wait(0)
          p_ref[...] = p.astype(dtype)

        acc, _, p16, m, l, alpha = pl.run_state(body)(
            (plgpu.ACC.init(acc), plgpu.ACC.init(_zeros(shape_s)), p16, m, l, m))
        plgpu.barrier_arrive(v_free.at[prev])
        acc = acc * _row_vec(alpha, acc.shape)
        pingpong()
        return acc, m, l, p16

      acc, m, l, p16 = blocks.walk(step2, (acc0, m, l, p16), after_first=True)
      last = blocks.slot(blocks.n_blocks - 1)
      plgpu.barrier_wait(v_ready.at[last])

      def pv_last(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[last])
        pingpong()

      acc = pl.run_state(pv_last)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[last])
      return acc, m, l

    def done(acc, m, l):
      pl.when(wg == 0)(pingpong)
      finish(acc, m, l)

    if not overlap:
      done(*blocks.walk(step, (acc0, m0, l0)))
    else:   # the peeled first and last blocks need one block at least
      pl.when(blocks.n_steps == 0)(lambda: done(acc0, m0, l0))
      pl.when(blocks.n_steps > 0)(lambda: done(*overlapped_walk()))

  @pl.when(wg == wgs)
  def _memory():
    _memory_registers(register_budget(wgs))
    kvh = lax.div(h, group_size)

    def load(j, slot, wait_free: bool):
      keys = (b, pl.ds(blocks.key0(j, block_kv), block_kv), kvh)
      # K is freed (after QK) before V (after PV): refill each as soon as it can.
      if wait_free:
        plgpu.barrier_wait(k_free.at[slot])
      _load_parts(_gmem(k_ref, *keys), [part.at[slot] for part in k_parts], k_ready.at[slot])
      if wait_free:
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    blocks.stream(load, k_ref.shape[1] // block_kv)


# ------------------------------------------------------------------ backward --
#
# Both kernels take lse2 = lse * log2(e) with +inf on rows that must give
# P = 0 (lse = -inf, padding rows), and delta = rowsum(dO * O) - dlse, both
# [B, Hq, Tq_pad] f32, so P = exp2(S * scale * log2(e) - lse2) is NaN-free.


def _zeros(shape):
  return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def backward_dkdv_kernel(kv_table_ref, entries_ref, q_ref, k_ref, v_ref, do_ref,  # noqa: C901
                         lse2_ref, delta_ref, *refs, scale: float, softcap: float | None,
                         causal: bool, window: tuple[int, int], has_segments: bool,
                         block_q: int, block_kv: int, stages: int, wgs: int, group_size: int,
                         fused_dq: bool = False, ordered: bool = False, overlap: bool = False):
  """One CTA per (kv head, kv block t, batch): dK, dV of wgs * block_kv keys.

  kv_table_ref: [n_kv_blocks, KV_TABLE_WIDTH], entries_ref: [n_entries,
  ENTRY_WIDTH] int32 (plan.make_backward_plan); q_ref: [B, Tq_pad, Hq, Dqk],
  do_ref: [B, Tq_pad, Hq, Dv]; k_ref: [B, Tk_pad, Hk, Dqk], v_ref: [B,
  Tk_pad, Hk, Dv]; lse2_ref, delta_ref: [B, Hq, Tq_pad] f32; (qseg_ref [B,
  Tq_pad], kvseg_ref [B, Tk_pad] int32); dk_ref, dv_ref shaped like k_ref,
  v_ref. Compute warpgroup i owns keys KV_BLOCK * wgs * block_kv + i *
  block_kv + [0, block_kv) and walks every (q head of this kv head, entry)
  step that the memory warpgroup streams (Q, dO tiles of block_q rows, lse2
  and delta [block_q]); it sums over them in fp32 registers and writes its
  keys once: deterministic, no atomics. ``smem`` (launch.backward names it):
  k [wgs, block_kv, Dqk], v [wgs, block_kv, Dv] (K, V in, then dK, dV out),
  q [stages, block_q, Dqk], do [stages, block_q, Dv], lse, delta [stages,
  block_q] f32;
  ``bars``: kv_ready [2 * wgs] (K then V of each warpgroup), q_ready,
  do_ready, lse_ready, delta_ready, free [stages].

  fused_dq (:func:`fused_dq_split`; not deterministic: the order of the fp32
  adds varies): the CTA also computes dQ = dS K of every step. Each
  warpgroup stores its dS^T (bf16) into ``smem["ds"]`` [2, wgs, block_kv,
  block_q] (a 2-step ring), and after ``bars["ds_ready"]`` (wgs arrivals) says
  every warpgroup's is there, warpgroup i computes its [block_q, 64] share of
  dQ (dQ_SHARE) into ``smem["dq"]`` [wgs, block_q, 64] f32 and TMA-adds it
  into ``dq_acc_ref`` [B, Tq_pad, Hq, Dqk] f32 (unscaled, zeroed by the
  launcher; an input Ref before dk_ref). ``bars["done"]`` (wgs arrivals)
  keeps K, which the shares read, until every warpgroup has finished.

  ordered (with fused_dq; deterministic): warpgroup i stages its share and
  arrives ``bars["dq_full"][i]``; warp 1 of the memory warpgroup (the writer)
  waits until the q block's semaphore (a grid-wide int32 per (b, q head, q
  block)) reaches the entry's turn (plan.E_TURN), adds the shares, waits for
  the adds to land, counts the semaphore up (the last turn takes it back to
  0 instead) and frees the staging (``bars["dq_empty"]``). Masked entries
  come first (the plan orders them so). Warp 0 streams the ring.
  """
  if has_segments:
    qseg_ref, kvseg_ref, *refs = refs
  else:
    qseg_ref = kvseg_ref = None
  if fused_dq:
    dq_acc_ref, dk_ref, dv_ref, smem, bars = refs
  else:
    dk_ref, dv_ref, smem, bars = refs
  if ordered:   # one turn counter per (b, q head, q block), shared by the grid
    n_sems = q_ref.shape[0] * q_ref.shape[2] * (q_ref.shape[1] // block_q)
    sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_sems,)))
  k_smem, v_smem, q_smem, do_smem = smem["k"], smem["v"], smem["q"], smem["do"]
  lse_smem, delta_smem = smem["lse"], smem["delta"]
  kv_ready, q_ready, do_ready = bars["kv_ready"], bars["q_ready"], bars["do_ready"]
  lse_ready, delta_ready, free = bars["lse_ready"], bars["delta_ready"], bars["free"]
  dtype = q_ref.dtype
  dqk, dv_width = q_ref.shape[-1], v_ref.shape[-1]

  kvh = lax.axis_index("h")
  t = lax.axis_index("t")
  b = lax.axis_index("b")
  wg = lax.axis_index("wg")
  kb = kv_table_ref[t, plan_lib.KV_BLOCK]
  start = kv_table_ref[t, plan_lib.KV_START]
  n_full = kv_table_ref[t, plan_lib.KV_N_FULL]
  n_ent = kv_table_ref[t, plan_lib.KV_N_ENTRIES]
  n_steps = n_ent * group_size
  shape_t = (block_kv, block_q)

  def entry_row0(e, warp: bool = False):
    # Say that rows start on whole blocks (TMA slices need it proven); code
    # under warp semantics (the ordered mode's memory warps) cannot say it.
    row0 = entries_ref[start + e, plan_lib.E_ROW0]
    return row0 if warp else pl.multiple_of(row0, block_q)

  share = fused_dq_split(dqk, wgs) if fused_dq else None

  def share_cols(w, warp: bool = False):
    """The dQ columns warpgroup w's share covers."""
    if share != "halves":
      return pl.ds(0, DQ_SHARE)
    col0 = w * DQ_SHARE
    return pl.ds(col0 if warp else pl.multiple_of(col0, DQ_SHARE), DQ_SHARE)

  def add_share(w, e, h, warp: bool = False):
    """TMA-adds warpgroup w's staged share of step (q head h, entry e) into dQ."""
    plgpu.copy_smem_to_gmem(
        smem["dq"].at[w], dq_acc_ref.at[b, pl.ds(entry_row0(e, warp), block_q),
                                        kvh * group_size + h, share_cols(w, warp)],
        reduction_op="add")

  @pl.when(wg < wgs)
  def _compute():  # noqa: C901 -- one warpgroup role over shared buffers (see forward_kernel)
    _compute_registers(register_budget(wgs, fused_dq))
    key0 = pl.multiple_of(kb * (wgs * block_kv) + wg * block_kv, block_kv)
    keys = (b, pl.ds(key0, block_kv), kvh)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], kv_ready.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], kv_ready.at[wgs + wg])
    kvseg = None
    if has_segments:
      kvseg = _load(kvseg_ref.at[b, pl.ds(key0, block_kv)], plgpu.Layout.WGMMA.reduce(1))
    if share == "halves":
      for j in range(wgs):   # the dQ shares read every warpgroup's K
        plgpu.barrier_wait(kv_ready.at[j])
    else:
      plgpu.barrier_wait(kv_ready.at[wg])
    plgpu.barrier_wait(kv_ready.at[wgs + wg])
    k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]

    def probs(s_t, e, slot, masked: bool):
      """P^T of S^T, and G^T with dS^T = G^T (dP^T - delta): G = P (1 - t^2)
      with a cap, else P itself (the same value)."""
      plgpu.barrier_wait(lse_ready.at[slot])
      lse2 = _load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
      x_t, c, cap_t = _logits(s_t, scale, softcap)
      p_t = jnp.exp2(x_t * c - _col_vec(lse2, shape_t))
      if masked:
        qseg = None
        row0 = entry_row0(e)
        if has_segments:
          qseg = _load(qseg_ref.at[b, pl.ds(row0, block_q)], plgpu.Layout.WGMMA.reduce(0))
        vis = _visible(entries_ref[start + e, plan_lib.E_QPOS0], key0,
                       entries_ref[start + e, plan_lib.E_KV_LEN], shape_t, causal=causal,
                       window=window, qseg=qseg, kvseg=kvseg, transposed=True)
        p_t = jnp.where(vis, p_t, 0.0)
      return p_t, (p_t if cap_t is None else p_t * (1.0 - cap_t * cap_t))

    def overlapped_step(i, e, h, slot, dk, dv, k_op, v_op, z, masked: bool):
      # S^T and dP^T issued together; P^T computed while dP^T runs; the bf16
      # operands (P^T for dV, dS^T for dK) written once no wgmma is in flight
      # (written under one, ptxas serializes every wgmma: note C7513). No soft
      # cap: its 1 - t^2 factor beside P^T and dP^T spilled 184 B.
      plgpu.barrier_wait(do_ready.at[slot])

      def s_dp(refs):
        s_ref, dp_ref, p_ref = refs
        plgpu.wgmma(s_ref, k_op, _t(q_smem.at[slot]))      # S^T = K Q^T
        plgpu.wgmma(dp_ref, v_op, _t(do_smem.at[slot]))    # dP^T = V dO^T
        p_ref[...], _ = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1), e, slot, masked)

      zeros = _zeros(shape_t)
      _, dp_t, p_t = pl.run_state(s_dp)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros), zeros))
      plgpu.barrier_wait(delta_ready.at[slot])
      delta = _load(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
      ds16 = (p_t * (dp_t - _col_vec(delta, shape_t))).astype(dtype)
      p16 = p_t.astype(dtype)
      if fused_dq:
        return fused_step(i, e, h, slot, ds16, dk, dv, k_op, z, p16=p16)

      def dv_dk(accs):
        dv_acc, dk_acc = accs
        plgpu.wgmma(dv_acc, p16, do_smem.at[slot])     # dV += P^T dO
        plgpu.wgmma(dk_acc, ds16, q_smem.at[slot])     # dK += dS^T Q

      dv, dk = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    def step(i, e, h, carry, masked: bool):
      dk, dv = carry
      slot = lax.rem(i, stages)
      z = _opaque_zero(i)
      k_op, v_op = k_smem.at[wg + z], v_smem.at[wg + z]   # k_tile, v_tile
      plgpu.barrier_wait(q_ready.at[slot])

      if overlap and softcap is None:
        return overlapped_step(i, e, h, slot, dk, dv, k_op, v_op, z, masked)

      def qk(s_ref):
        plgpu.wgmma(s_ref, k_op, _t(q_smem.at[slot]))
        return s_ref[...]

      s_t = pl.run_scoped(qk, plgpu.ACC(shape_t, jnp.float32))   # [keys, rows]
      p_t, g_t = probs(s_t, e, slot, masked)
      plgpu.barrier_wait(do_ready.at[slot])
      # With a cap, P in fp32 need not live on beside G.
      p16 = None if softcap is None else p_t.astype(dtype)

      def dv_dp(refs):
        dv_ref, dp_ref = refs
        plgpu.wgmma(dv_ref, p_t.astype(dtype) if p16 is None else p16,   # dV += P^T dO
                    do_smem.at[slot])
        plgpu.wgmma(dp_ref, v_op, _t(do_smem.at[slot]))           # dP^T = V dO^T

      dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros(shape_t))))
      plgpu.barrier_wait(delta_ready.at[slot])
      delta = _load(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
      ds_t = g_t * (dp_t - _col_vec(delta, shape_t))
      if fused_dq:
        return fused_step(i, e, h, slot, ds_t.astype(dtype), dk, dv, k_op, z)

      def dk_step(acc_ref):
        plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_smem.at[slot])   # dK += dS^T Q

      dk = pl.run_state(dk_step)(plgpu.ACC.init(dk))
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    if fused_dq:
      ds_smem, ds_ready = smem["ds"], bars["ds_ready"]
      dq_tile = smem["dq"].at[wg]

      def fused_step(i, e, h, slot, ds16, dk, dv, k_op, z, p16=None):
        """dK (and, given P^T in p16, dV) and this warpgroup's dQ share."""
        dslot = lax.rem(i, 2)
        ds_smem.at[dslot, wg][...] = ds16
        plgpu.commit_smem()
        if share == "halves":
          plgpu.barrier_arrive(ds_ready)

        def dk_dq(accs):   # (and dV, when P^T comes with them)
          dk_acc, dq_acc, *dv_acc = accs
          for acc in dv_acc:
            plgpu.wgmma(acc, p16, do_smem.at[slot])                   # dV += P^T dO
          plgpu.wgmma(dk_acc, ds16, q_smem.at[slot])                  # dK += dS^T Q
          if share == "halves":   # every warpgroup's keys, this warpgroup's columns
            plgpu.barrier_wait(ds_ready)
            for j in range(wgs):
              plgpu.wgmma(dq_acc, _t(ds_smem.at[dslot, j]), k_smem.at[j + z, :, share_cols(wg)])
          else:                   # this warpgroup's keys, every column
            plgpu.wgmma(dq_acc, _t(ds_smem.at[dslot, wg]), k_op)

        with_dv = () if p16 is None else (plgpu.ACC.init(dv),)
        dk, dq, *dv_out = pl.run_state(dk_dq)(
            (plgpu.ACC.init(dk), plgpu.ACC.init(_zeros((block_q, DQ_SHARE))), *with_dv))
        dv = dv_out[0] if dv_out else dv
        plgpu.barrier_arrive(free.at[slot])
        if ordered:   # the writer warp adds it, in its turn
          pl.when(i > 0)(lambda: plgpu.barrier_wait(bars["dq_empty"].at[wg]))
          dq_tile[...] = dq
          plgpu.commit_smem()
          plgpu.barrier_arrive(bars["dq_full"].at[wg])
          return dk, dv
        # The previous step's add has read the staging tile: overwrite it.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        dq_tile[...] = dq
        plgpu.commit_smem()
        add_share(wg, e, h)
        return dk, dv

    def head(h, carry):
      base = h * n_ent
      walk = lambda lo, hi, masked, c: lax.fori_loop(
          lo, hi, lambda e, cr: step(base + e, e, h, cr, masked), c)
      if ordered:   # the plan put the masked entries first
        return walk(n_ent - n_full, n_ent, False, walk(0, n_ent - n_full, True, carry))
      return walk(n_full, n_ent, True, walk(0, n_full, False, carry))

    dk, dv = lax.fori_loop(0, group_size, head,
                           (_zeros((block_kv, dqk)), _zeros((block_kv, dv_width))))
    if fused_dq:   # the other warpgroups' last dQ shares read this K tile
      plgpu.barrier_arrive(bars["done"])
      plgpu.barrier_wait(bars["done"])
    k_tile[...] = (dk * scale).astype(dtype)
    v_tile[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    _memory_registers(register_budget(wgs, fused_dq))

    def load(i, slot, wait_free: bool):
      h = lax.div(i, n_ent)
      e = i - h * n_ent
      row0 = entry_row0(e, warp=ordered)
      qh = kvh * group_size + h
      rows = (b, pl.ds(row0, block_q), qh)
      if wait_free:
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
      plgpu.copy_gmem_to_smem(lse2_ref.at[b, qh, pl.ds(row0, block_q)], lse_smem.at[slot],
                              lse_ready.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, qh, pl.ds(row0, block_q)], delta_smem.at[slot],
                              delta_ready.at[slot])

    def stream():
      for i in range(stages):
        pl.when(i < n_steps)(lambda i=i: load(i, i, False))

      @pl.loop(0, n_steps - stages)
      def _(j):
        load(j + stages, lax.rem(j, stages), True)

    if not ordered:
      stream()
      return
    n_qblocks = q_ref.shape[1] // block_q

    def write_dq():
      @pl.loop(0, n_steps)
      def _(i):
        h = lax.div(i, n_ent)
        e = i - h * n_ent
        row0 = entry_row0(e, warp=True)
        qh = kvh * group_size + h
        sem = sems.at[(b * q_ref.shape[2] + qh) * n_qblocks + lax.div(row0, block_q)]
        turn = entries_ref[start + e, plan_lib.E_TURN]
        n_turns = entries_ref[start + e, plan_lib.E_NTURNS]
        for w in range(wgs):
          plgpu.barrier_wait(bars["dq_full"].at[w])

        # Wait for this turn; the last one also takes the counter back to 0.
        # (Comparisons and nested whens only: jax 0.11.2 has no lowering of
        # `not` under warp semantics.)
        @pl.when(turn > 0)
        def _():
          pl.when(turn < n_turns - 1)(lambda: plgpu.semaphore_wait(
              sem, turn, decrement=False, memory_scope="gpu"))
          pl.when(turn == n_turns - 1)(lambda: plgpu.semaphore_wait(
              sem, turn, decrement=True, memory_scope="gpu"))
        for w in range(wgs):
          add_share(w, e, h, warp=True)
          if share != "halves" or w == wgs - 1:
            plgpu.wait_smem_to_gmem(0)   # landed (shares of the same columns: one at a time)
        pl.when(turn < n_turns - 1)(   # the next turn may go
            lambda: plgpu.semaphore_signal(sem, 1, memory_scope="gpu"))
        for w in range(wgs):
          plgpu.barrier_arrive(bars["dq_empty"].at[w])

    @pl.core_map(plgpu.WarpMesh(axis_name="warp"))
    def _():
      warp = lax.axis_index("warp")
      pl.when(warp == 0)(stream)
      pl.when(warp == 1)(write_dq)


def backward_dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs,
                       scale: float, softcap: float | None, causal: bool,
                       window: tuple[int, int],
                       has_segments: bool, block_q: int, block_kv: int, stages: int, wgs: int,
                       group_size: int):
  """One CTA per (q head, work row, batch): dQ of wgs * block_q rows.

  table_ref: [n_work, TABLE_WIDTH] int32 (the backward plan's dQ table);
  q_ref, k_ref, v_ref, do_ref as :func:`backward_dkdv_kernel`'s; lse2_ref,
  delta_ref: [B, Hq, Tq_pad] f32; (segment ids as the forward); dq_ref
  shaped like q_ref. Compute warpgroup i owns rows ROW0 + i * block_q + [0,
  block_q) and walks the forward's kv blocks (_KvBlocks), streamed by the
  memory warpgroup. ``smem`` (launch.backward names it): q [wgs, block_q,
  Dqk] (holds dQ at the end), do [wgs, block_q, Dv], k [stages, block_kv,
  Dqk], v [stages, block_kv, Dv], lse, delta [wgs, block_q] f32; ``bars``:
  rows_ready (a dict q, do, lse, delta of [wgs] barriers), k_ready, v_ready,
  free.
  """
  if has_segments:
    qseg_ref, kvseg_ref, dq_ref, smem, bars = refs
  else:
    qseg_ref = kvseg_ref = None
    dq_ref, smem, bars = refs
  q_smem, do_smem, k_smem, v_smem = smem["q"], smem["do"], smem["k"], smem["v"]
  lse_smem, delta_smem = smem["lse"], smem["delta"]
  rows_ready = bars["rows_ready"]   # the CTA's own tiles, by name and warpgroup
  k_ready, v_ready, free = bars["k_ready"], bars["v_ready"], bars["free"]
  dtype = q_ref.dtype
  dqk = q_ref.shape[-1]

  h = lax.axis_index("h")
  w = lax.axis_index("w")
  b = lax.axis_index("b")
  wg = lax.axis_index("wg")
  row0 = pl.multiple_of(table_ref[w, plan_lib.ROW0], block_q)
  q_pos0 = table_ref[w, plan_lib.QPOS0]
  kv_len = table_ref[w, plan_lib.KV_LEN]
  blocks = _KvBlocks(table_ref, w, window, stages)
  shape_s = (block_q, block_kv)

  @pl.when(wg < wgs)
  def _compute():
    _compute_registers(register_budget(wgs))
    my_row0 = pl.multiple_of(row0 + wg * block_q, block_q)
    my_pos0 = q_pos0 + wg * block_q
    rows = (b, pl.ds(my_row0, block_q), h)
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[wg], rows_ready["q"].at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[wg], rows_ready["do"].at[wg])
    plgpu.copy_gmem_to_smem(lse2_ref.at[b, h, pl.ds(my_row0, block_q)], lse_smem.at[wg],
                            rows_ready["lse"].at[wg])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(my_row0, block_q)], delta_smem.at[wg],
                            rows_ready["delta"].at[wg])
    qseg = None
    if has_segments:
      qseg = _load(qseg_ref.at[b, pl.ds(my_row0, block_q)], plgpu.Layout.WGMMA.reduce(1))
    for name in ("q", "do", "lse", "delta"):
      plgpu.barrier_wait(rows_ready[name].at[wg])
    lse2 = _load(lse_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
    delta = _load(delta_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
    q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]

    def step(j, dq, masked: bool):
      slot = blocks.slot(j)
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

      def s_dp(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, q_tile, _t(k_smem.at[slot]))     # S = Q K^T
        plgpu.wgmma(dp_ref, do_tile, _t(v_smem.at[slot]))   # dP = dO V^T

      s, dpv = pl.run_state(s_dp)((plgpu.ACC.init(_zeros(shape_s)),
                                   plgpu.ACC.init(_zeros(shape_s))))
      x, c, cap = _logits(s, scale, softcap)
      p = jnp.exp2(x * c - _row_vec(lse2, shape_s))
      if masked:
        kvseg = None
        if has_segments:
          kvseg = _load(kvseg_ref.at[b, pl.ds(j * block_kv, block_kv)],
                        plgpu.Layout.WGMMA.reduce(0))
        vis = _visible(my_pos0, j * block_kv, kv_len, shape_s, causal=causal, window=window,
                       qseg=qseg, kvseg=kvseg)
        p = jnp.where(vis, p, 0.0)
      if cap is not None:   # dS = P (1 - t^2) (dP - delta)
        p = p * (1.0 - cap * cap)
      ds = p * (dpv - _row_vec(delta, shape_s))

      def dq_step(acc_ref):
        plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])   # dQ += dS K

      dq = pl.run_state(dq_step)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(free.at[slot])
      return dq

    dq = blocks.walk(step, _zeros((block_q, dqk)))
    q_tile[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    _memory_registers(register_budget(wgs))
    kvh = lax.div(h, group_size)

    def load(j, slot, wait_free: bool):
      keys = (b, pl.ds(blocks.key0(j, block_kv), block_kv), kvh)
      if wait_free:
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    blocks.stream(load, k_ref.shape[1] // block_kv)


# ------------------------------------------------ backward, head_dim split --
#
# head_split=2: the two compute warpgroups share one tile. Warpgroup 0 (the
# "score" side) computes S and P and writes P to shared memory; warpgroup 1
# (the "gradient" side) computes dP, reads P, and writes dS; each then adds
# its part of the output columns (dK, dV or dQ). P crosses in fp32, one
# buffer (dS from a bf16-rounded P doubled the dQ and dK error at S8192); dS
# crosses in dtype, a ring slot per step, as a shared-memory wgmma operand.
# Every tile is stored as two column parts (launch._backward_split sizes
# them with config.split_columns so that both warpgroups do the same wgmma
# work), each a plain wgmma operand and a TMA box; a tile load is one TMA
# per part on a barrier that expects two arrivals. Scratch and barriers are
# dicts whose keys the launcher and these kernels share.

SCORE_WG, GRAD_WG = 0, 1


def _contract_parts(acc_shape, a_parts, b_parts):
  """sum_i a_i b_i^T in fp32 registers: one product over two tiles' columns."""
  def body(acc_ref):
    _contract(acc_ref, a_parts, b_parts)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(acc_shape, jnp.float32))


def _at(parts, slot):
  """Ring slot ``slot`` of every column part."""
  return tuple(part.at[slot] for part in parts)


# One kernel, three warpgroup roles over shared buffers (as forward_kernel).
def backward_dkdv_split_kernel(kv_table_ref, entries_ref, q_ref, k_ref, v_ref, do_ref,  # noqa: C901
                               lse2_ref, delta_ref, *refs, scale: float, causal: bool,
                               window: tuple[int, int], has_segments: bool, block_q: int,
                               block_kv: int, stages: int, group_size: int):
  """dK/dV with head_split=2: one CTA per (kv head, kv block t, batch) of block_kv keys.

  Refs as :func:`backward_dkdv_kernel`. Per step (q head, entry), warpgroup
  0: S^T = K Q^T, P^T -> smem; warpgroup 1: dP^T = V dO^T, dS^T = P^T (dP^T
  - delta) -> smem; warpgroup i: dV[:, part i] += P^T dO[:, part i], dK[:,
  part i] += dS^T Q[:, part i]. Scratch (``smem``), tuples of two column
  parts: k [block_kv, a_i], v [block_kv, b_i] (K, V in; dK, dV out), q
  [stages, block_q, a_i], do [stages, block_q, b_i]; lse, delta [stages,
  block_q] f32, p [block_kv, block_q] f32 (P^T), ds [stages, block_kv,
  block_q] (dS^T).
  """
  if has_segments:
    qseg_ref, kvseg_ref, dk_ref, dv_ref, smem, bars = refs
  else:
    qseg_ref = kvseg_ref = None
    dk_ref, dv_ref, smem, bars = refs
  dtype = q_ref.dtype

  kvh = lax.axis_index("h")
  t = lax.axis_index("t")
  b = lax.axis_index("b")
  wg = lax.axis_index("wg")
  kb = kv_table_ref[t, plan_lib.KV_BLOCK]
  start = kv_table_ref[t, plan_lib.KV_START]
  n_full = kv_table_ref[t, plan_lib.KV_N_FULL]
  n_ent = kv_table_ref[t, plan_lib.KV_N_ENTRIES]
  n_steps = n_ent * group_size
  c = scale * LOG2E
  shape_t = (block_kv, block_q)
  key0 = pl.multiple_of(kb * block_kv, block_kv)
  keys = pl.ds(key0, block_kv)

  def entry_row0(e):
    return pl.multiple_of(entries_ref[start + e, plan_lib.E_ROW0], block_q)

  def walk(step, i: int):
    def head(h, carry):
      base = h * n_ent
      carry = lax.fori_loop(0, n_full, lambda e, cr: step(base + e, e, cr, False), carry)
      return lax.fori_loop(n_full, n_ent, lambda e, cr: step(base + e, e, cr, True), carry)
    zeros = (_zeros((block_kv, smem["k"][i].shape[-1])), _zeros((block_kv, smem["v"][i].shape[-1])))
    return lax.fori_loop(0, group_size, head, zeros)

  def accumulate(slot, i: int, p16, dk, dv):
    """dV[:, part i] += P^T dO_i, then (once dS^T is written) dK[:, part i] += dS^T Q_i."""
    def body(refs):
      dv_ref, dk_ref = refs
      plgpu.wgmma(dv_ref, p16, smem["do"][i].at[slot])
      if i == SCORE_WG:
        plgpu.barrier_wait(bars["ds"].at[slot])
      plgpu.wgmma(dk_ref, smem["ds"].at[slot], smem["q"][i].at[slot])
    dv, dk = pl.run_state(body)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
    plgpu.barrier_arrive(bars["free"].at[slot])
    return dk, dv

  def finish(i: int, dk, dv):
    smem["k"][i][...] = (dk * scale).astype(dtype)
    smem["v"][i][...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem["k"][i], dk_ref.at[b, keys, kvh, _part_cols(smem["k"], i)])
    plgpu.copy_smem_to_gmem(smem["v"][i], dv_ref.at[b, keys, kvh, _part_cols(smem["v"], i)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == SCORE_WG)
  def _score():
    _compute_registers("two_compute")
    _load_parts(_gmem(k_ref, b, keys, kvh), smem["k"], bars["kv"].at[0])
    kvseg = None
    if has_segments:
      kvseg = _load(kvseg_ref.at[b, keys], plgpu.Layout.WGMMA.reduce(1))
    plgpu.barrier_wait(bars["kv"].at[0])

    def step(i, e, carry, masked: bool):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(bars["q"].at[slot])
      s_t = _contract_parts(shape_t, smem["k"], _at(smem["q"], slot))   # [keys, rows]
      plgpu.barrier_wait(bars["lse"].at[slot])
      lse2 = _load(smem["lse"].at[slot], plgpu.Layout.WGMMA.reduce(0))
      p_t = jnp.exp2(s_t * c - _col_vec(lse2, shape_t))
      if masked:
        qseg = None
        if has_segments:
          qseg = _load(qseg_ref.at[b, pl.ds(entry_row0(e), block_q)],
                       plgpu.Layout.WGMMA.reduce(0))
        vis = _visible(entries_ref[start + e, plan_lib.E_QPOS0], key0,
                       entries_ref[start + e, plan_lib.E_KV_LEN], shape_t, causal=causal,
                       window=window, qseg=qseg, kvseg=kvseg, transposed=True)
        p_t = jnp.where(vis, p_t, 0.0)
      pl.when(i > 0)(lambda: plgpu.barrier_wait(bars["p_free"]))   # step i - 1's P read
      smem["p"][...] = p_t
      plgpu.commit_smem()
      plgpu.barrier_arrive(bars["p"])
      plgpu.barrier_wait(bars["do"].at[slot])
      return accumulate(slot, SCORE_WG, p_t.astype(dtype), *carry)

    finish(SCORE_WG, *walk(step, SCORE_WG))

  @pl.when(wg == GRAD_WG)
  def _grad():
    _compute_registers("two_compute")
    _load_parts(_gmem(v_ref, b, keys, kvh), smem["v"], bars["kv"].at[1])
    plgpu.barrier_wait(bars["kv"].at[1])

    def step(i, e, carry, masked: bool):
      del e, masked   # P^T arrives masked
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(bars["do"].at[slot])
      dp_t = _contract_parts(shape_t, smem["v"], _at(smem["do"], slot))
      plgpu.barrier_wait(bars["delta"].at[slot])
      delta = _load(smem["delta"].at[slot], plgpu.Layout.WGMMA.reduce(0))
      plgpu.barrier_wait(bars["p"])
      p_t = _load(smem["p"], plgpu.Layout.WGMMA)
      plgpu.barrier_arrive(bars["p_free"])
      smem["ds"].at[slot][...] = (p_t * (dp_t - _col_vec(delta, shape_t))).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(bars["ds"].at[slot])
      plgpu.barrier_wait(bars["q"].at[slot])
      return accumulate(slot, GRAD_WG, p_t.astype(dtype), *carry)

    finish(GRAD_WG, *walk(step, GRAD_WG))

  @pl.when(wg == 2)
  def _memory():
    _memory_registers("two_compute")

    def load(i, slot, wait_free: bool):
      h = lax.div(i, n_ent)
      e = i - h * n_ent
      row0 = entry_row0(e)
      qh = kvh * group_size + h
      rows = pl.ds(row0, block_q)
      if wait_free:
        plgpu.barrier_wait(bars["free"].at[slot])
      _load_parts(_gmem(q_ref, b, rows, qh), _at(smem["q"], slot), bars["q"].at[slot])
      plgpu.copy_gmem_to_smem(lse2_ref.at[b, qh, rows], smem["lse"].at[slot],
                              bars["lse"].at[slot])
      _load_parts(_gmem(do_ref, b, rows, qh), _at(smem["do"], slot), bars["do"].at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, qh, rows], smem["delta"].at[slot],
                              bars["delta"].at[slot])

    for i in range(stages):
      pl.when(i < n_steps)(lambda i=i: load(i, i, False))

    @pl.loop(0, n_steps - stages)
    def _(j):
      load(j + stages, lax.rem(j, stages), True)


def backward_dq_split_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs,
                             scale: float, causal: bool, window: tuple[int, int],
                             has_segments: bool, block_q: int, block_kv: int, stages: int,
                             group_size: int):
  """dQ with head_split=2: one CTA per (q head, work row, batch) of block_q rows.

  Refs as :func:`backward_dq_kernel`. Per kv block (_KvBlocks), warpgroup 0:
  S = Q K^T, P -> smem; warpgroup 1: dP = dO V^T, dS = P (dP - delta) ->
  smem; warpgroup i: dQ[:, part i] += dS K[:, part i]. Scratch (``smem``),
  tuples of two column parts: q [block_q, a_i] (holds dQ at the end), do
  [block_q, b_i], k [stages, block_kv, a_i], v [stages, block_kv, b_i];
  lse, delta [block_q] f32, p [block_q, block_kv] f32, ds [stages, block_q,
  block_kv].
  """
  if has_segments:
    qseg_ref, kvseg_ref, dq_ref, smem, bars = refs
  else:
    qseg_ref = kvseg_ref = None
    dq_ref, smem, bars = refs
  dtype = q_ref.dtype

  h = lax.axis_index("h")
  w = lax.axis_index("w")
  b = lax.axis_index("b")
  wg = lax.axis_index("wg")
  row0 = pl.multiple_of(table_ref[w, plan_lib.ROW0], block_q)
  q_pos0 = table_ref[w, plan_lib.QPOS0]
  kv_len = table_ref[w, plan_lib.KV_LEN]
  blocks = _KvBlocks(table_ref, w, window, stages)
  c = scale * LOG2E
  shape_s = (block_q, block_kv)
  rows = pl.ds(row0, block_q)

  def accumulate(slot, i: int, dq):
    def body(acc_ref):
      if i == SCORE_WG:
        plgpu.barrier_wait(bars["ds"].at[slot])
      plgpu.wgmma(acc_ref, smem["ds"].at[slot], smem["k"][i].at[slot])   # dQ_i += dS K_i
    dq = pl.run_state(body)(plgpu.ACC.init(dq))
    plgpu.barrier_arrive(bars["free"].at[slot])
    return dq

  def finish(i: int, dq):
    smem["q"][i][...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem["q"][i], dq_ref.at[b, rows, h, _part_cols(smem["q"], i)])
    plgpu.wait_smem_to_gmem(0)

  def zeros(i: int):
    return _zeros((block_q, smem["q"][i].shape[-1]))

  @pl.when(wg == SCORE_WG)
  def _score():
    _compute_registers("two_compute")
    _load_parts(_gmem(q_ref, b, rows, h), smem["q"], bars["q"])
    plgpu.copy_gmem_to_smem(lse2_ref.at[b, h, rows], smem["lse"], bars["lse"])
    qseg = None
    if has_segments:
      qseg = _load(qseg_ref.at[b, rows], plgpu.Layout.WGMMA.reduce(1))
    plgpu.barrier_wait(bars["q"])
    plgpu.barrier_wait(bars["lse"])
    lse2 = _load(smem["lse"], plgpu.Layout.WGMMA.reduce(1))

    def step(j, dq, masked: bool):
      slot = blocks.slot(j)
      plgpu.barrier_wait(bars["k"].at[slot])
      s = _contract_parts(shape_s, smem["q"], _at(smem["k"], slot))
      p = jnp.exp2(s * c - _row_vec(lse2, shape_s))
      if masked:
        kvseg = None
        if has_segments:
          kvseg = _load(kvseg_ref.at[b, pl.ds(j * block_kv, block_kv)],
                        plgpu.Layout.WGMMA.reduce(0))
        vis = _visible(q_pos0, j * block_kv, kv_len, shape_s, causal=causal, window=window,
                       qseg=qseg, kvseg=kvseg)
        p = jnp.where(vis, p, 0.0)
      # The previous block's P must have been read.
      pl.when(j > blocks.block(0))(lambda: plgpu.barrier_wait(bars["p_free"]))
      smem["p"][...] = p
      plgpu.commit_smem()
      plgpu.barrier_arrive(bars["p"])
      return accumulate(slot, SCORE_WG, dq)

    finish(SCORE_WG, blocks.walk(step, zeros(SCORE_WG)))

  @pl.when(wg == GRAD_WG)
  def _grad():
    _compute_registers("two_compute")
    _load_parts(_gmem(do_ref, b, rows, h), smem["do"], bars["do"])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], smem["delta"], bars["delta"])
    plgpu.barrier_wait(bars["do"])
    plgpu.barrier_wait(bars["delta"])
    delta = _load(smem["delta"], plgpu.Layout.WGMMA.reduce(1))

    def step(j, dq, masked: bool):
      del masked   # P arrives masked
      slot = blocks.slot(j)
      plgpu.barrier_wait(bars["v"].at[slot])
      dpv = _contract_parts(shape_s, smem["do"], _at(smem["v"], slot))
      plgpu.barrier_wait(bars["p"])
      p = _load(smem["p"], plgpu.Layout.WGMMA)
      plgpu.barrier_arrive(bars["p_free"])
      smem["ds"].at[slot][...] = (p * (dpv - _row_vec(delta, shape_s))).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(bars["ds"].at[slot])
      plgpu.barrier_wait(bars["k"].at[slot])
      return accumulate(slot, GRAD_WG, dq)

    finish(GRAD_WG, blocks.walk(step, zeros(GRAD_WG)))

  @pl.when(wg == 2)
  def _memory():
    _memory_registers("two_compute")
    kvh = lax.div(h, group_size)

    def load(j, slot, wait_free: bool):
      keys = pl.ds(blocks.key0(j, block_kv), block_kv)
      if wait_free:
        plgpu.barrier_wait(bars["free"].at[slot])
      _load_parts(_gmem(k_ref, b, keys, kvh), _at(smem["k"], slot), bars["k"].at[slot])
      _load_parts(_gmem(v_ref, b, keys, kvh), _at(smem["v"], slot), bars["v"].at[slot])

    blocks.stream(load, k_ref.shape[1] // block_kv)
