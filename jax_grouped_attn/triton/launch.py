"""Triton launchers: shapes, grids, strides and the named kernel launches
(the forward here, the backward in ``backward.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.config import ForwardConfig
from jax_grouped_attn.plan import LOG2E, Plan, Problem
from jax_grouped_attn.triton import kernels, runtime
from jax_grouped_attn.triton.backward import backward  # noqa: F401  (the backend's launcher)
from jax_grouped_attn.triton.common import contiguous_strides, input_precision


def forward_constexprs(*, q_shape, kv_shape, problem: Problem, plan: Plan, dtype) -> dict:
  """The constexpr arguments of kernels.forward_kernel (also used by compile_check)."""
  b, tq_pad, hq, dp = q_shape
  _, tk_pad, hk, _ = kv_shape
  sq = contiguous_strides(q_shape)
  sk = contiguous_strides(kv_shape)
  sl = contiguous_strides((b, hq, tq_pad))
  return dict(
      QK_SCALE=float(problem.scale * LOG2E), HQ=hq, GROUP_SIZE=hq // hk,
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
