"""Triton launchers: shapes, grids, strides and the named kernel launches.

The forward is one launch; the backward three (delta, dK/dV, dQ), each one
launch for all groups. Compiled through jax_triton on GPU, interpreted on CPU
(``runtime.call``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.config import BackwardConfig, ForwardConfig
from jax_grouped_attn.plan import LOG2E, BackwardPlan, Plan, Problem
from jax_grouped_attn.triton import kernels, runtime
from jax_grouped_attn.triton.common import contiguous_strides, input_precision


def forward_constexprs(*, q_shape, kv_shape, problem: Problem, plan: Plan, dtype) -> dict:
  """The constexpr arguments of kernels.forward_kernel (also used by compile_check)."""
  b, tq_pad, hq, dp = q_shape
  _, tk_pad, hk, _ = kv_shape
  sq = contiguous_strides(q_shape)
  sk = contiguous_strides(kv_shape)
  sl = contiguous_strides((b, hq, tq_pad))
  return dict(
      QK_SCALE=float(problem.scale * LOG2E), SOFTCAP=float(problem.softcap or 0.0),
      HQ=hq, GROUP_SIZE=hq // hk,
      SQ_B=sq[0], SQ_T=sq[1], SQ_H=sq[2], SK_B=sk[0], SK_T=sk[1], SK_H=sk[2],
      SL_B=sl[0], SL_H=sl[1], SSQ_B=tq_pad, SSK_B=tk_pad,
      CAUSAL=bool(problem.causal), HAS_SEGMENTS=bool(problem.has_segments),
      WINDOW_LEFT=int(problem.window_left), WINDOW_RIGHT=int(problem.window_right),
      BLOCK_Q=plan.block_q, BLOCK_K=plan.block_k, DP=dp,
      DOT_PRECISION=input_precision(dtype))


def forward(q, k, v, q_seg, kv_seg, *, problem: Problem, plan: Plan,
            config: ForwardConfig, interpret: bool):
  """Grouped forward in ONE kernel launch.

  q: [B, Tq_pad, Hq, Dp], k/v: [B, Tk_pad, Hk, Dp] (padded layouts, plan.py);
  q_seg: [B, Tq_pad] int32 | None, kv_seg: [B, Tk_pad] int32 | None.
  Returns out [B, Tq_pad, Hq, Dp] (q.dtype) and lse [B, Hq, Tq_pad] float32.
  """
  b, tq_pad, hq, dp = q.shape
  tk_pad, hk = k.shape[1], k.shape[2]
  if dp & (dp - 1) or dp < 16:
    raise ValueError(f"padded head_dim {dp} must be a power of two >= 16.")
  if k.shape != (b, tk_pad, hk, dp) or v.shape != k.shape:
    raise ValueError(f"k/v shapes {k.shape}/{v.shape} do not match q {q.shape}.")
  if tq_pad % plan.block_q or tk_pad % plan.block_k:
    raise ValueError(
        f"padded lengths ({tq_pad=}, {tk_pad=}) must be multiples of the plan's "
        f"tiles ({plan.block_q}, {plan.block_k}).")
  table = jnp.asarray(plan.table)
  if not problem.has_segments:
    # Never read (HAS_SEGMENTS=False); any int32 buffer fills the pointer slots.
    q_seg = kv_seg = table
  constexprs = forward_constexprs(q_shape=q.shape, kv_shape=k.shape, problem=problem,
                                  plan=plan, dtype=q.dtype)
  out_shape = [jax.ShapeDtypeStruct((b, tq_pad, hq, dp), q.dtype),
               jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)]
  if plan.n_work == 0:
    return (jnp.zeros(out_shape[0].shape, q.dtype),
            jnp.full(out_shape[1].shape, -np.inf, jnp.float32))
  out, lse = runtime.call(
      table, q, k, v, q_seg, kv_seg, kernel=kernels.forward_kernel,
      out_shape=out_shape, grid=(plan.n_work, b * hq), name="grouped_attention_fwd",
      num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
      **constexprs)
  return out, lse


# The delta kernel is elementwise-light: few warps, nothing to pipeline.
DELTA_NUM_WARPS, DELTA_NUM_STAGES = 4, 1


def backward_constexprs(*, q_shape, kv_shape, problem: Problem, block_q: int, block_k: int,
                        dtype) -> dict:
  """The constexpr arguments shared by dkdv_kernel and dq_kernel."""
  b, tq_pad, hq, dp = q_shape
  _, tk_pad, hk, _ = kv_shape
  sq = contiguous_strides(q_shape)
  sk = contiguous_strides(kv_shape)
  sl = contiguous_strides((b, hq, tq_pad))
  return dict(
      QK_SCALE=float(problem.scale * LOG2E), SOFTCAP=float(problem.softcap or 0.0),
      SCALE=float(problem.scale), GROUP_SIZE=hq // hk,
      SQ_B=sq[0], SQ_T=sq[1], SQ_H=sq[2], SK_B=sk[0], SK_T=sk[1], SK_H=sk[2],
      SL_B=sl[0], SL_H=sl[1], SSQ_B=tq_pad, SSK_B=tk_pad,
      CAUSAL=bool(problem.causal), HAS_SEGMENTS=bool(problem.has_segments),
      WINDOW_LEFT=int(problem.window_left), WINDOW_RIGHT=int(problem.window_right),
      BLOCK_Q=block_q, BLOCK_K=block_k, DP=dp,
      DOT_PRECISION=input_precision(dtype))


def backward(q, k, v, q_seg, kv_seg, out, lse, dout, dlse, *, problem: Problem,
             plan: BackwardPlan, config: BackwardConfig, interpret: bool):
  """Grouped backward on the padded layouts.

  q, out, dout: [B, Tq_pad, Hq, Dp]; k, v: [B, Tk_pad, Hk, Dp]; lse, dlse:
  [B, Hq, Tq_pad] f32 (dout, dlse zero on padding rows); q_seg: [B, Tq_pad],
  kv_seg: [B, Tk_pad] int32 or None. ``plan`` is make_backward_plan(problem,
  config's dK/dV tiles, config's dQ tiles). Returns dq [B, Tq_pad, Hq, Dp],
  dk, dv [B, Tk_pad, Hk, Dp] in the input dtypes.
  """
  b, tq_pad, hq, dp = q.shape
  tk_pad, hk = k.shape[1], k.shape[2]
  qplan = plan.plan
  if (qplan.tq_pad, qplan.tk_pad) != (tq_pad, tk_pad) or dp & (dp - 1):
    raise ValueError(f"backward: shapes {q.shape}, {k.shape} do not match the plan's layout "
                     f"({qplan.tq_pad}, {qplan.tk_pad}).")
  table = jnp.asarray(qplan.table)
  if not problem.has_segments:
    # Never read (HAS_SEGMENTS=False); any int32 buffer fills the pointer slots.
    q_seg = kv_seg = table
  dkdv_tiles, dq_tiles = config.dkdv, config.dq
  sq = contiguous_strides(q.shape)
  sl = contiguous_strides((b, hq, tq_pad))
  f32_rows = jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)
  delta_rows = plan.row_block

  delta, lse2 = runtime.call(
      jnp.asarray(qplan.valid_rows, jnp.int32), out, dout, lse, dlse,
      kernel=kernels.delta_kernel, out_shape=[f32_rows, f32_rows],
      grid=(tq_pad // delta_rows, b * hq), name="grouped_attention_bwd_delta",
      num_warps=DELTA_NUM_WARPS, num_stages=DELTA_NUM_STAGES, interpret=interpret,
      HQ=hq, SQ_B=sq[0], SQ_T=sq[1], SQ_H=sq[2], SL_B=sl[0], SL_H=sl[1],
      BLOCK_Q=delta_rows, DP=dp)

  common = dict(q_shape=q.shape, kv_shape=k.shape, problem=problem, dtype=q.dtype)
  dk, dv = runtime.call(
      jnp.asarray(plan.kv_table), jnp.asarray(plan.entries), q, k, v, dout, lse2, delta,
      q_seg, kv_seg, kernel=kernels.dkdv_kernel,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(plan.n_kv_blocks, b * hk), name="grouped_attention_bwd_dkdv", HK=hk,
      num_warps=dkdv_tiles.num_warps, num_stages=dkdv_tiles.num_stages, interpret=interpret,
      **backward_constexprs(block_q=plan.block_q, block_k=plan.block_k, **common))
  dq = runtime.call(
      table, q, k, v, dout, lse2, delta, q_seg, kv_seg, kernel=kernels.dq_kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(qplan.n_work, b * hq), name="grouped_attention_bwd_dq", HQ=hq,
      num_warps=dq_tiles.num_warps, num_stages=dq_tiles.num_stages, interpret=interpret,
      **backward_constexprs(block_q=qplan.block_q, block_k=qplan.block_k, **common))
  return dq, dk, dv
