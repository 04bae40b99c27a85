"""Mosaic GPU launchers: plans, shapes, grids, scratch and the plgpu.kernel calls.

Same contract as jax_grouped_attn.pallas.launch (see jax_grouped_attn/autodiff.py):
``forward`` and ``backward`` take and return the padded layouts of plan.py.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_grouped_attn import plan as plan_lib
from jax_grouped_attn.pallas.mosaic import heuristics, kernels
from jax_grouped_attn.pallas.mosaic.config import (
  DQ_SHARE,
  MosaicBackwardConfig,
  MosaicForwardConfig,
  column_parts,
  fused_unfit,
  padded_head_dim,
  split_columns,
)
from jax_grouped_attn.plan import BackwardPlan, Plan, Problem
from jax_grouped_attn.vma import shape_struct

MIN_BLOCK = 64   # wgmma tiles are 64 rows: plans never shrink below this
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def forward_config(problem: Problem, config: MosaicForwardConfig | None) -> MosaicForwardConfig:
  """``config``, or the heuristic default for the problem's head dims."""
  return config or heuristics.forward_config(problem.head_dim, head_dim_v=problem.dv)


def backward_config(problem: Problem, config: MosaicBackwardConfig | None) -> MosaicBackwardConfig:
  """``config``, or the heuristic default for the problem's head dims."""
  return config or heuristics.backward_config(problem.head_dim, head_dim_v=problem.dv)


def forward_plan(problem: Problem, config: MosaicForwardConfig | None = None) -> Plan:
  """Work table with one row per CTA (compute_wgs * block_q rows)."""
  cfg = forward_config(problem, config)
  return plan_lib.make_plan(problem, cfg.rows_per_cta, cfg.block_kv, min_block=MIN_BLOCK)


def backward_plan(problem: Problem, config: MosaicBackwardConfig | None = None) -> BackwardPlan:
  """dK/dV CTAs own kv_per_cta keys; dQ CTAs dq_rows_per_cta rows (config.py)."""
  cfg = backward_config(problem, config)
  return plan_lib.make_backward_plan(
      problem, cfg.block_q, cfg.kv_per_cta, cfg.dq_rows_per_cta, cfg.dq_block_kv,
      min_block=MIN_BLOCK, ordered=cfg.ordered)


def _table(table):
  """A plan table as a kernel input. Unlike pallas_call, plgpu.kernel lets
  inputs differ in shard_map varying axes; a varying table would make its
  scalars (loop bounds) varying inside the body, which fori_loop rejects."""
  return jnp.asarray(table)


def _check_inputs(q, k, v):
  if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
        f"Mosaic GPU kernels take bf16/f16; use backend='triton' for float32 "
        f"(got {q.dtype=}, {k.dtype=}, {v.dtype=}).")
  if (q.ndim != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0]
      or q.shape[3] != k.shape[3]):
    raise ValueError(f"expected q [B, Tq, Hq, Dqk], k [B, Tk, Hk, Dqk], v [B, Tk, Hk, Dv]: "
                     f"{q.shape=}, {k.shape=}, {v.shape=}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"Hq must be a multiple of Hk: {q.shape=}, {k.shape=}.")


def _dkdv_grid(cfg: MosaicBackwardConfig, hk: int, n_kv_blocks: int, b: int) -> dict:
  """The dK/dV kernels' grid by axis name (the kernels read "h", "t", "b").
  Mosaic launches the last axis fastest, so (h, t, b) goes kv head by kv
  head and (t, h, b) (config.kv_major) kv block by kv block over all heads."""
  if cfg.kv_major:
    return dict(grid=(n_kv_blocks, hk, b), grid_names=("t", "h", "b"))
  return dict(grid=(hk, n_kv_blocks, b), grid_names=("h", "t", "b"))


def _pad_dim(x, dp):
  d = x.shape[-1]
  return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _tiling(dtype):
  # 128-byte swizzle over 64-element (128-byte) rows: wgmma's shared layout.
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _wgs(rows: int, block: int, compute_wgs: int, what: str) -> int:
  if rows % block or rows // block > compute_wgs:
    raise ValueError(f"{what}: the plan's tile ({rows}) must be 1..compute_wgs={compute_wgs} "
                     f"times the config's ({block}); build the plan with this module's "
                     f"forward_plan/backward_plan.")
  return rows // block


def _tile(*shape, dtype):
  """A swizzled shared-memory tile (a wgmma operand and TMA box) of ``shape``."""
  return plgpu.SMEM(shape, dtype, transforms=_tiling(dtype))


def _parts(widths, *shape, dtype):
  """One tile per column part: ``shape`` + (width,)."""
  return tuple(_tile(*shape, w, dtype=dtype) for w in widths)


def forward(q, k, v, q_seg, kv_seg, *, problem: Problem, plan: Plan,
            config: MosaicForwardConfig | None, interpret=False):
  """Grouped forward in ONE Mosaic GPU kernel.

  q: [B, Tq_pad, Hq, Dqk], k: [B, Tk_pad, Hk, Dqk], v: [B, Tk_pad, Hk, Dv]
  (padded layouts, plan.py); q_seg: [B, Tq_pad] int32 | None, kv_seg: [B,
  Tk_pad] int32 | None. Returns out [B, Tq_pad, Hq, Dv] (q.dtype) and lse [B,
  Hq, Tq_pad] float32. Tiles are sized for each width (padded to 64s).
  """
  _check_inputs(q, k, v)
  cfg = forward_config(problem, config)
  b, tq_pad, hq, dqk_in = q.shape
  tk_pad, hk, dv_in = k.shape[1], k.shape[2], v.shape[3]
  if (tq_pad, tk_pad) != (plan.tq_pad, plan.tk_pad):
    raise ValueError(f"forward: {q.shape=}, {k.shape=} do not match the plan's layout "
                     f"({plan.tq_pad=}, {plan.tk_pad=}).")
  dqk, dv = padded_head_dim(dqk_in), padded_head_dim(dv_in)
  q, k, v = _pad_dim(q, dqk), _pad_dim(k, dqk), _pad_dim(v, dv)
  wgs = _wgs(plan.block_q, cfg.block_q, cfg.compute_wgs, "forward")
  block_kv = plan.block_k
  if block_kv % MIN_BLOCK:
    raise ValueError(f"forward: {plan.block_k=} must be a multiple of {MIN_BLOCK}.")
  stages = cfg.max_concurrent_steps
  has_segments = problem.has_segments
  # Q and K as column parts, so that O (dv wide) overwrites Q's first part
  # when dv < dqk: one part when the widths match or O has its own tile.
  parts = column_parts(dqk, dv) if dv <= dqk else (dqk,)
  # By the names kernels.forward_kernel reads.
  smem = dict(
      q=_parts(parts, wgs, cfg.block_q, dtype=q.dtype),         # Q in (O out: q[0] or o)
      k=_parts(parts, stages, block_kv, dtype=q.dtype),         # K ring
      v=_tile(stages, block_kv, dv, dtype=q.dtype),             # V ring
      lse=plgpu.SMEM((wgs, cfg.block_q), jnp.float32),          # lse out
  )
  if dv > dqk:
    smem["o"] = _tile(wgs, cfg.block_q, dv, dtype=q.dtype)
  n_parts = len(parts)   # TMA arrivals per Q / K tile
  bars = dict(
      q_ready=plgpu.Barrier(num_arrivals=n_parts, num_barriers=wgs),
      k_ready=plgpu.Barrier(num_arrivals=n_parts, num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      sched=plgpu.Barrier(num_arrivals=wgs),
  )
  body = functools.partial(
      kernels.forward_kernel, scale=float(problem.scale), softcap=problem.softcap,
      causal=problem.causal,
      window=problem.kernel_window, has_segments=has_segments, block_q=cfg.block_q,
      block_kv=block_kv, stages=stages, wgs=wgs, group_size=hq // hk, overlap=cfg.overlap)
  if plan.n_work == 0:   # no rows at all
    return (jnp.zeros((b, tq_pad, hq, dv_in), q.dtype),
            jnp.full((b, hq, tq_pad), -jnp.inf, jnp.float32))
  args = [_table(plan.table), q, k, v] + ([q_seg, kv_seg] if has_segments else [])
  out, lse = plgpu.kernel(
      body,
      out_type=(shape_struct((b, tq_pad, hq, dv), q.dtype, like=q),
                shape_struct((b, hq, tq_pad), jnp.float32, like=q)),
      scratch_types=(smem, bars),
      grid=(hq, plan.n_work, b),
      grid_names=("h", "w", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **_interpret_kwargs(interpret),
  )(*args)
  return out[..., :dv_in], lse


def _interpret_kwargs(interpret):
  """Mosaic GPU interpret mode (jax 0.10's interpreter stops at run_state,
  which these kernels use; passed through for JAX versions that have it)."""
  if not interpret:
    return {}
  if interpret is True:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
    interpret = InterpretGPUParams()
  return {"interpret": interpret}


# ------------------------------------------------------------------ backward --

def backward_residuals(out, lse, dout, dlse, valid_rows):
  """delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) (+inf where P must be
  0: lse = -inf, padding rows), both [B, Hq, Tq_pad] f32. Plain jnp: one
  memory-bound pass that XLA fuses."""
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  delta = delta - dlse
  keep = jnp.asarray(valid_rows)[None, None, :] & (lse != -jnp.inf)
  lse2 = jnp.where(keep, lse * kernels.LOG2E, jnp.inf)
  return delta, lse2


def backward(q, k, v, q_seg, kv_seg, out, lse, dout, dlse, *, problem: Problem,
             plan: BackwardPlan, config: MosaicBackwardConfig | None, interpret=False):
  """Grouped backward: residuals (jnp), then one dK/dV and one dQ Mosaic GPU kernel.

  q: [B, Tq_pad, Hq, Dqk], out, dout: [B, Tq_pad, Hq, Dv]; k: [B, Tk_pad, Hk,
  Dqk], v: [B, Tk_pad, Hk, Dv]; lse, dlse: [B, Hq, Tq_pad] f32 (dout, dlse
  zero on padding rows); segment ids as in :func:`forward`. ``plan`` is
  :func:`backward_plan`'s. Returns dq, dk, dv shaped like q, k, v, in the
  input dtypes; deterministic (each output tile is written once by one CTA).
  """
  _check_inputs(q, k, v)
  cfg = backward_config(problem, config)
  b, tq_pad, hq, dqk_in = q.shape
  tk_pad, hk, dv_in = k.shape[1], k.shape[2], v.shape[3]
  qplan = plan.plan
  if (qplan.tq_pad, qplan.tk_pad) != (tq_pad, tk_pad):
    raise ValueError(f"backward: {q.shape=}, {k.shape=} do not match the plan's layout "
                     f"({qplan.tq_pad=}, {qplan.tk_pad=}).")
  dqk, dv = padded_head_dim(dqk_in), padded_head_dim(dv_in)
  q, k = _pad_dim(q, dqk), _pad_dim(k, dqk)
  v, out, dout = (_pad_dim(x, dv) for x in (v, out, dout))
  grp = hq // hk
  stages = cfg.max_concurrent_steps
  has_segments = problem.has_segments
  seg_args = [q_seg, kv_seg] if has_segments else []
  dtype = q.dtype
  delta, lse2 = backward_residuals(out, lse, dout, dlse.astype(jnp.float32), qplan.valid_rows)
  params = plgpu.CompilerParams(approx_math=True)
  common = dict(scale=float(problem.scale), causal=problem.causal, window=problem.kernel_window,
                has_segments=has_segments, stages=stages, group_size=grp)

  if cfg.head_split == 2:
    if problem.softcap is not None:
      raise ValueError(
          f"MosaicBackwardConfig.head_split=2 has no soft cap (logits_soft_cap="
          f"{problem.softcap}): its warpgroups pass P through shared memory, which has no "
          "room left for the 1 - tanh^2 factor. Use head_split=1 or backend='triton'.")
    dq, dk, dv_ = _backward_split(q, k, v, q_seg, kv_seg, dout, delta, lse2, problem=problem,
                                  plan=plan, cfg=cfg, common=common, params=params,
                                  interpret=interpret)
    return dq[..., :dqk_in], dk[..., :dqk_in], dv_[..., :dv_in]

  if cfg.fused_dq:
    dq, dk, dv_ = _backward_fused(q, k, v, seg_args, dout, delta, lse2, problem=problem,
                                  plan=plan, cfg=cfg, common=common, params=params)
    return dq[..., :dqk_in], dk[..., :dqk_in], dv_[..., :dv_in]

  # dK/dV: CTA (kv head, t, batch) owns kv block kv_table[t].
  wgs = _wgs(plan.block_k, cfg.block_kv, cfg.compute_wgs, "backward dK/dV")
  bq, bkv = plan.block_q, cfg.block_kv
  # By the names kernels.backward_dkdv_kernel reads.
  smem = dict(
      k=_tile(wgs, bkv, dqk, dtype=dtype),       # K in, dK out
      v=_tile(wgs, bkv, dv, dtype=dtype),        # V in, dV out
      q=_tile(stages, bq, dqk, dtype=dtype),     # Q ring
      do=_tile(stages, bq, dv, dtype=dtype),     # dO ring
      lse=plgpu.SMEM((stages, bq), jnp.float32),        # lse2 ring
      delta=plgpu.SMEM((stages, bq), jnp.float32),      # delta ring
  )
  ring = lambda: plgpu.Barrier(num_barriers=stages)
  bars = dict(kv_ready=plgpu.Barrier(num_barriers=2 * wgs),         # K, V of each warpgroup
              q_ready=ring(), do_ready=ring(), lse_ready=ring(), delta_ready=ring(),
              free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
  dk, dv_ = plgpu.kernel(
      functools.partial(kernels.backward_dkdv_kernel, block_q=bq, block_kv=bkv, wgs=wgs,
                        softcap=problem.softcap, overlap=cfg.overlap, **common),
      out_type=(shape_struct((b, tk_pad, hk, dqk), k.dtype, like=q),
                shape_struct((b, tk_pad, hk, dv), v.dtype, like=q)),
      scratch_types=(smem, bars),
      **_dkdv_grid(cfg, hk, plan.n_kv_blocks, b),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=params,
      **_interpret_kwargs(interpret),
  )(_table(plan.kv_table), _table(plan.entries), q, k, v, dout, lse2,
    delta, *seg_args)

  # dQ: CTA (q head, w, batch) owns the rows of dQ-table row w.
  if qplan.n_work == 0:
    dq = jnp.zeros_like(q)
  else:
    wgs = _wgs(qplan.block_q, cfg.dq_block_q, cfg.compute_wgs, "backward dQ")
    bq, bkv = cfg.dq_block_q, qplan.block_k
    # By the names kernels.backward_dq_kernel reads.
    smem = dict(
        q=_tile(wgs, bq, dqk, dtype=dtype),        # Q in, dQ out
        do=_tile(wgs, bq, dv, dtype=dtype),        # dO
        k=_tile(stages, bkv, dqk, dtype=dtype),    # K ring
        v=_tile(stages, bkv, dv, dtype=dtype),     # V ring
        lse=plgpu.SMEM((wgs, bq), jnp.float32),           # lse2
        delta=plgpu.SMEM((wgs, bq), jnp.float32),         # delta
    )
    own = lambda: plgpu.Barrier(num_barriers=wgs)
    bars = dict(rows_ready=dict(q=own(), do=own(), lse=own(), delta=own()),
                k_ready=plgpu.Barrier(num_barriers=stages),
                v_ready=plgpu.Barrier(num_barriers=stages),
                free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
    dq = plgpu.kernel(
        functools.partial(kernels.backward_dq_kernel, block_q=bq, block_kv=bkv, wgs=wgs,
                          softcap=problem.softcap, **common),
        out_type=shape_struct((b, tq_pad, hq, dqk), q.dtype, like=q),
        scratch_types=(smem, bars),
        grid=(hq, qplan.n_work, b),
        grid_names=("h", "w", "b"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=params,
        **_interpret_kwargs(interpret),
    )(_table(qplan.table), q, k, v, dout, lse2, delta, *seg_args)
  return dq[..., :dqk_in], dk[..., :dqk_in], dv_[..., :dv_in]


def _backward_split(q, k, v, q_seg, kv_seg, dout, delta, lse2, *, problem, plan, cfg, common,
                    params, interpret):
  """The head_split=2 dK/dV and dQ kernels (kernels.backward_*_split_kernel):
  every D-wide tile as two column parts (config.split_columns), one per
  compute warpgroup's share of the output; shared memory and barriers are
  dicts by the names the kernels use. Returns padded dq, dk, dv."""
  b, tq_pad, hq, dqk = q.shape
  tk_pad, hk, dv = k.shape[1], k.shape[2], v.shape[3]
  dtype = q.dtype
  qk_parts, v_parts, dq_first = split_columns(dqk, dv)
  qplan = plan.plan
  stages = cfg.max_concurrent_steps
  seg_args = [q_seg, kv_seg] if problem.has_segments else []
  ring = lambda arrivals: plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages)
  if plan.block_k != cfg.block_kv or qplan.block_q != cfg.dq_block_q:
    raise ValueError(f"backward: the plan's tiles ({plan.block_k=}, {qplan.block_q=}) must be "
                     f"the config's ({cfg.block_kv=}, {cfg.dq_block_q=}) with head_split=2; "
                     f"build the plan with this module's backward_plan.")

  bq, bkv = plan.block_q, cfg.block_kv
  smem = dict(k=_parts(qk_parts, bkv, dtype=dtype), v=_parts(v_parts, bkv, dtype=dtype),
              q=_parts(qk_parts, stages, bq, dtype=dtype),
              do=_parts(v_parts, stages, bq, dtype=dtype),
              lse=plgpu.SMEM((stages, bq), jnp.float32),
              delta=plgpu.SMEM((stages, bq), jnp.float32),
              p=plgpu.SMEM((bkv, bq), jnp.float32),
              ds=_tile(stages, bkv, bq, dtype=dtype))
  bars = dict(kv=plgpu.Barrier(num_arrivals=2, num_barriers=2),   # K parts, V parts
              q=ring(2), do=ring(2), lse=ring(1), delta=ring(1),
              p=plgpu.Barrier(), p_free=plgpu.Barrier(), ds=ring(1), free=ring(2))
  dk, dv_ = plgpu.kernel(
      functools.partial(kernels.backward_dkdv_split_kernel, block_q=bq, block_kv=bkv, **common),
      out_type=(shape_struct((b, tk_pad, hk, dqk), k.dtype, like=q),
                shape_struct((b, tk_pad, hk, dv), v.dtype, like=q)),
      scratch_types=(smem, bars),
      **_dkdv_grid(cfg, hk, plan.n_kv_blocks, b),
      num_threads=3,
      thread_name="wg",
      compiler_params=params,
      **_interpret_kwargs(interpret),
  )(_table(plan.kv_table), _table(plan.entries), q, k, v, dout, lse2, delta, *seg_args)

  if qplan.n_work == 0:
    dq = jnp.zeros_like(q)
  else:
    bq, bkv = cfg.dq_block_q, qplan.block_k
    dq_parts = column_parts(dqk, dq_first)
    smem = dict(q=_parts(dq_parts, bq, dtype=dtype), do=_parts(v_parts, bq, dtype=dtype),
                k=_parts(dq_parts, stages, bkv, dtype=dtype),
                v=_parts(v_parts, stages, bkv, dtype=dtype),
                lse=plgpu.SMEM((bq,), jnp.float32), delta=plgpu.SMEM((bq,), jnp.float32),
                p=plgpu.SMEM((bq, bkv), jnp.float32),
                ds=_tile(stages, bq, bkv, dtype=dtype))
    # The CTA's rows: Q parts and lse2 (score warpgroup), dO parts and delta.
    bars = dict(q=plgpu.Barrier(num_arrivals=2), lse=plgpu.Barrier(),
                do=plgpu.Barrier(num_arrivals=2), delta=plgpu.Barrier(),
                k=ring(2), v=ring(2), p=plgpu.Barrier(), p_free=plgpu.Barrier(), ds=ring(1),
                free=ring(2))
    dq = plgpu.kernel(
        functools.partial(kernels.backward_dq_split_kernel, block_q=bq, block_kv=bkv, **common),
        out_type=shape_struct((b, tq_pad, hq, dqk), q.dtype, like=q),
        scratch_types=(smem, bars),
        grid=(hq, qplan.n_work, b),
        grid_names=("h", "w", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=params,
        **_interpret_kwargs(interpret),
    )(_table(qplan.table), q, k, v, dout, lse2, delta, *seg_args)
  return dq, dk, dv_


def _backward_fused(q, k, v, seg_args, dout, delta, lse2, *, problem, plan, cfg, common, params):
  """config.fused_dq: the dK/dV kernel also TMA-adds dQ = dS K into a zeroed
  fp32 accumulator [B, Tq_pad, Hq, Dqk], then dq = accumulator * scale (one
  XLA fusion). plgpu.kernel aliases no operand, so the accumulator is a
  mutable Ref handed to pl.kernel inside pl.run_state (the launcher stays a
  pure function). Returns padded dq, dk, dv."""
  b, tq_pad, hq, dqk = q.shape
  hk, dv = k.shape[2], v.shape[3]
  dtype = q.dtype
  stages = cfg.max_concurrent_steps
  wgs = _wgs(plan.block_k, cfg.block_kv, cfg.compute_wgs, "backward dK/dV")
  bq, bkv = plan.block_q, cfg.block_kv
  why = fused_unfit(cfg, dqk, dv)
  if why is not None:
    raise ValueError(why)
  # By the names kernels.backward_dkdv_kernel reads.
  smem = dict(
      k=_tile(wgs, bkv, dqk, dtype=dtype),       # K in (read by every dQ share), dK out
      v=_tile(wgs, bkv, dv, dtype=dtype),        # V in, dV out
      q=_tile(stages, bq, dqk, dtype=dtype),     # Q ring
      do=_tile(stages, bq, dv, dtype=dtype),     # dO ring
      lse=plgpu.SMEM((stages, bq), jnp.float32),        # lse2 ring
      delta=plgpu.SMEM((stages, bq), jnp.float32),      # delta ring
      ds=_tile(2, wgs, bkv, bq, dtype=dtype),           # dS^T, a 2-step ring
      dq=plgpu.SMEM((wgs, bq, DQ_SHARE), jnp.float32, transforms=_tiling(jnp.float32)),
  )
  ring = lambda: plgpu.Barrier(num_barriers=stages)
  bars = dict(kv_ready=plgpu.Barrier(num_barriers=2 * wgs),
              q_ready=ring(), do_ready=ring(), lse_ready=ring(), delta_ready=ring(),
              free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
              ds_ready=plgpu.Barrier(num_arrivals=wgs),
              done=plgpu.Barrier(num_arrivals=wgs))
  if cfg.ordered:   # staging shares handed to the writer warp and back
    bars.update(dq_full=plgpu.Barrier(num_barriers=wgs), dq_empty=plgpu.Barrier(num_barriers=wgs))
  body = functools.partial(kernels.backward_dkdv_kernel, block_q=bq, block_kv=bkv, wgs=wgs,
                           softcap=problem.softcap, fused_dq=True, ordered=cfg.ordered,
                           overlap=cfg.overlap, **common)
  mesh = plgpu.Mesh(**_dkdv_grid(cfg, hk, plan.n_kv_blocks, b), num_threads=wgs + 1,
                    thread_name="wg")

  def kernel_body(*refs):
    pl.run_scoped(functools.partial(body, *refs), smem, bars, collective_axes="wg")

  call = pl.kernel(kernel_body, out_type=(), mesh=mesh, compiler_params=params,
                   name="grouped_attention_bwd_fused")
  args = (_table(plan.kv_table), _table(plan.entries), q, k, v, dout, lse2, delta, *seg_args)

  def run(refs):
    call(*args, *refs)

  # dK and dV are Refs too (a kernel's outputs cannot leave run_state): every
  # CTA writes its keys, so their zeros are only the initial value.
  acc, dk, dv_ = pl.run_state(run)((jnp.zeros((b, tq_pad, hq, dqk), jnp.float32),
                                    jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)))
  return (acc * problem.scale).astype(dtype), dk, dv_
