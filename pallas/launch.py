"""Pallas launchers: shapes, grids, BlockSpecs and the named pallas_calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_grouped_attn.config import ForwardConfig
from jax_grouped_attn.plan import Plan, Problem
from jax_grouped_attn.pallas import kernels


def dot_precision(dtype):
  """fp32 inputs use IEEE fp32 dots (no silent tf32); 16-bit use the default."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def forward(q, k, v, q_seg, kv_seg, *, problem: Problem, plan: Plan,
            config: ForwardConfig, interpret: bool):
  """Grouped forward in ONE pallas_call.

  q: [B, Tq_pad, Hq, Dp], k/v: [B, Tk_pad, Hk, Dp] (padded layouts, plan.py);
  q_seg: [B, Tq_pad] int32 | None, kv_seg: [B, Tk_pad] int32 | None.
  Returns out [B, Tq_pad, Hq, Dp] (q.dtype) and lse [B, Hq, Tq_pad] float32.
  """
  b, tq_pad, hq, dp = q.shape
  tk_pad, hk = k.shape[1], k.shape[2]
  grp = hq // hk
  table = jnp.asarray(plan.table)
  has_segments = q_seg is not None

  q_spec = pl.BlockSpec((None, tq_pad, None, dp), lambda w, bh: (bh // hq, 0, bh % hq, 0))
  kv_spec = pl.BlockSpec((None, tk_pad, None, dp),
                         lambda w, bh: (bh // hq, 0, (bh % hq) // grp, 0))
  in_specs = [pl.BlockSpec(table.shape, lambda w, bh: (0, 0)), q_spec, kv_spec, kv_spec]
  args = [table, q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq_pad), lambda w, bh: (bh // hq, 0)),
                 pl.BlockSpec((None, tk_pad), lambda w, bh: (bh // hq, 0))]
    args += [q_seg, kv_seg]
  kernel = functools.partial(
      kernels.forward_kernel, scale=problem.scale, causal=problem.causal,
      has_segments=has_segments, block_q=plan.block_q, block_k=plan.block_k,
      precision=dot_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(plan.n_work, b * hq),
      in_specs=in_specs,
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, tq_pad), lambda w, bh: (bh // hq, bh % hq, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, tq_pad, hq, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="grouped_attention_fwd",
  )(*args)
