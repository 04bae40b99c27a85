"""Pallas launchers: shapes, grids, BlockSpecs and the named pallas_calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_grouped_attn.config import BackwardConfig, ForwardConfig
from jax_grouped_attn.pallas import kernels
from jax_grouped_attn.plan import BackwardPlan, Plan, Problem
from jax_grouped_attn.vma import pvary, shape_struct, union


def lax_precision(dtype):
  """fp32 inputs use IEEE fp32 dots (no silent tf32); 16-bit use the default."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _compiler_params(tiles):
  return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _varying_like(table, q):
  """Plan tables are constants; inside shard_map (check_vma) a kernel's inputs
  must vary over the same mesh axes, so mark them like q."""
  return pvary(table, union(q))


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
  table = _varying_like(jnp.asarray(plan.table), q)
  has_segments = problem.has_segments

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
      kernels.forward_kernel, scale=problem.scale, softcap=problem.softcap,
      causal=problem.causal,
      window=problem.kernel_window, has_segments=has_segments, block_q=plan.block_q,
      block_k=plan.block_k, precision=lax_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(plan.n_work, b * hq),
      in_specs=in_specs,
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, tq_pad), lambda w, bh: (bh // hq, bh % hq, 0))],
      out_shape=[shape_struct((b, tq_pad, hq, dp), q.dtype, like=q),
                 shape_struct((b, hq, tq_pad), jnp.float32, like=q)],
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="grouped_attention_fwd",
  )(*args)


# ------------------------------------------------------------------ backward --

def backward(q, k, v, q_seg, kv_seg, out, lse, dout, dlse, *, problem: Problem,
             plan: BackwardPlan, config: BackwardConfig, interpret: bool):
  """Grouped backward: three pallas_calls (delta, dK/dV, dQ), each one launch
  for all groups.

  q, out, dout: [B, Tq_pad, Hq, Dp]; k, v: [B, Tk_pad, Hk, Dp]; lse, dlse:
  [B, Hq, Tq_pad] f32 (dout, dlse zero on padding rows); segment ids as in
  :func:`forward`. ``plan`` is make_backward_plan(problem, config's dK/dV
  tiles, config's dQ tiles). Returns dq [B, Tq_pad, Hq, Dp], dk, dv
  [B, Tk_pad, Hk, Dp] in the input dtypes.
  """
  b, tq_pad, hq, dp = q.shape
  tk_pad, hk = k.shape[1], k.shape[2]
  grp = hq // hk
  qplan = plan.plan
  if (qplan.tq_pad, qplan.tk_pad) != (tq_pad, tk_pad):
    raise ValueError(f"backward: shapes {q.shape}, {k.shape} do not match the plan's layout "
                     f"({qplan.tq_pad}, {qplan.tk_pad}).")
  has_segments = problem.has_segments
  precision = lax_precision(q.dtype)
  f32_rows = shape_struct((b, hq, tq_pad), jnp.float32, like=q)

  # delta = rowsum(dO * O) - dlse, and lse in base 2 with +inf on rows that
  # must give P = 0 (lse = -inf, padding rows).
  rows = plan.row_block
  valid = _varying_like(jnp.asarray(qplan.valid_rows, jnp.int32), q)
  row_blk = pl.BlockSpec((None, rows, None, dp), lambda i, bh: (bh // hq, i, bh % hq, 0))
  vec_blk = pl.BlockSpec((None, None, rows), lambda i, bh: (bh // hq, bh % hq, i))
  delta, lse2 = pl.pallas_call(
      kernels.backward_delta_kernel,
      grid=(tq_pad // rows, b * hq),
      in_specs=[pl.BlockSpec((rows,), lambda i, bh: (i,)), row_blk, row_blk, vec_blk,
                vec_blk],
      out_specs=[vec_blk, vec_blk],
      out_shape=[f32_rows, f32_rows],
      compiler_params=_compiler_params(config.dkdv),
      interpret=interpret,
      name="grouped_attention_bwd_delta",
  )(valid, out, dout, lse, dlse)

  # dK, dV: program (t, bh) owns kv block kv_table[t] of batch bh // Hk, kv
  # head bh % Hk, and reads the G q heads of that kv head.
  kv_table = _varying_like(jnp.asarray(plan.kv_table), q)
  entries = _varying_like(jnp.asarray(plan.entries), q)
  qg_spec = pl.BlockSpec((None, tq_pad, grp, dp), lambda t, bh: (bh // hk, 0, bh % hk, 0))
  kv_spec = pl.BlockSpec((None, tk_pad, None, dp), lambda t, bh: (bh // hk, 0, bh % hk, 0))
  vg_spec = pl.BlockSpec((None, grp, tq_pad), lambda t, bh: (bh // hk, bh % hk, 0))
  in_specs = [pl.BlockSpec(kv_table.shape, lambda t, bh: (0, 0)),
              pl.BlockSpec(entries.shape, lambda t, bh: (0, 0)),
              qg_spec, kv_spec, kv_spec, qg_spec, vg_spec, vg_spec]
  args = [kv_table, entries, q, k, v, dout, lse2, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq_pad), lambda t, bh: (bh // hk, 0)),
                 pl.BlockSpec((None, tk_pad), lambda t, bh: (bh // hk, 0))]
    args += [q_seg, kv_seg]
  dk, dv = pl.pallas_call(
      functools.partial(
          kernels.backward_dkdv_kernel, scale=problem.scale, softcap=problem.softcap,
          causal=problem.causal,
          window=problem.kernel_window, has_segments=has_segments, group_size=grp,
          block_q=plan.block_q, block_k=plan.block_k, precision=precision),
      grid=(plan.n_kv_blocks, b * hk),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[shape_struct(k.shape, k.dtype, like=q),
                 shape_struct(v.shape, v.dtype, like=q)],
      compiler_params=_compiler_params(config.dkdv),
      interpret=interpret,
      name="grouped_attention_bwd_dkdv",
  )(*args)

  # dQ: the forward work table, program (w, bh) for batch bh // Hq, q head bh % Hq.
  table = _varying_like(jnp.asarray(qplan.table), q)
  q_spec = pl.BlockSpec((None, tq_pad, None, dp), lambda w, bh: (bh // hq, 0, bh % hq, 0))
  kvq_spec = pl.BlockSpec((None, tk_pad, None, dp),
                          lambda w, bh: (bh // hq, 0, (bh % hq) // grp, 0))
  v_spec = pl.BlockSpec((None, None, tq_pad), lambda w, bh: (bh // hq, bh % hq, 0))
  in_specs = [pl.BlockSpec(table.shape, lambda w, bh: (0, 0)), q_spec, kvq_spec,
              kvq_spec, q_spec, v_spec, v_spec]
  args = [table, q, k, v, dout, lse2, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq_pad), lambda w, bh: (bh // hq, 0)),
                 pl.BlockSpec((None, tk_pad), lambda w, bh: (bh // hq, 0))]
    args += [q_seg, kv_seg]
  dq = pl.pallas_call(
      functools.partial(
          kernels.backward_dq_kernel, scale=problem.scale, softcap=problem.softcap,
          causal=problem.causal,
          window=problem.kernel_window, has_segments=has_segments, block_q=qplan.block_q,
          block_k=qplan.block_k, precision=precision),
      grid=(qplan.n_work, b * hq),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=shape_struct(q.shape, q.dtype, like=q),
      compiler_params=_compiler_params(config.dq),
      interpret=interpret,
      name="grouped_attention_bwd_dq",
  )(*args)
  return dq, dk, dv
