"""The one custom_vjp wiring shared by every kernel backend.

A backend module provides
  forward(q, k, v, q_seg, kv_seg, *, problem, plan, config, interpret)
      -> (out [B, Tq_pad, Hq, Dp], lse [B, Hq, Tq_pad] f32)
  backward(q, k, v, q_seg, kv_seg, out, lse, dout, dlse, *, problem, plan,
           config, interpret) -> (dq, dk, dv)      (padded layouts; plan is
           a plan.BackwardPlan)
on the padded layouts fixed by plan.py; the layout change happens here once.
Residuals are q, k, v, out, lse (and segment ids): nothing O(T^2).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from jax_grouped_attn import plan as plan_lib
from jax_grouped_attn import vma
from jax_grouped_attn.config import (AttentionConfig, default_backward_config,
                                     default_forward_config, padded_head_dim)
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_attention, reference_backward

_BACKEND_MODULES = {
    "pallas": "jax_grouped_attn.pallas.launch",
    "triton": "jax_grouped_attn.triton.launch",
}
BACKWARD_MODES = ("kernel", "reference")


def backend_module(name: str):
  return importlib.import_module(_BACKEND_MODULES[name])


# ------------------------------------------------------------------- vmap ---

def _fold(x, batched: bool, axis_size: int):
  """[V, B, ...] (or unbatched [B, ...]) -> [V*B, ...]."""
  if x is None:
    return None
  if not batched:
    x = jnp.broadcast_to(x, (axis_size,) + x.shape)
  return x.reshape((axis_size * x.shape[1],) + x.shape[2:])


def batch_folding(launch):
  """Makes a kernel launcher vmappable by folding vmapped axes into batch.

  Every array argument and result of ``launch`` has batch as its leading axis,
  so ``vmap`` over any extra leading axis is one launch with batch V*B.
  (triton_call and the interpreter callback have no batching rule of their
  own; Pallas gets the same single-launch behaviour for free.)
  """
  @functools.wraps(launch)
  def call(*arrays, **static):
    fn = jax.custom_batching.custom_vmap(lambda *a: launch(*a, **static))

    @fn.def_vmap
    def _rule(axis_size, in_batched, *a):
      folded = [_fold(x, b, axis_size) for x, b in zip(a, in_batched)]
      outs = call(*folded, **static)
      outs = jax.tree.map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), outs)
      return outs, jax.tree.map(lambda _: True, outs)

    return fn(*arrays)
  return call


# ----------------------------------------------------------------- layout ---

def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def to_q_layout(x, plan: plan_lib.Plan, axis: int = 1):
  """[.., Tq, ..] -> [.., Tq_pad, ..] (each group padded to whole q blocks)."""
  return x if plan.identity_layout else jnp.take(x, jnp.asarray(plan.src_rows), axis=axis)


def to_q_layout_zero_padded(x, plan: plan_lib.Plan, axis: int = 1):
  """Like to_q_layout, with padding rows zeroed (cotangents: padding rows
  must contribute nothing to dK/dV)."""
  if plan.identity_layout:
    return x
  shape = [1] * x.ndim
  shape[axis] = plan.tq_pad
  valid = jnp.asarray(plan.valid_rows).reshape(shape)
  return jnp.where(valid, to_q_layout(x, plan, axis), jnp.zeros((), x.dtype))


def from_q_layout(x, plan: plan_lib.Plan, axis: int = 1):
  return x if plan.identity_layout else jnp.take(x, jnp.asarray(plan.dst_rows), axis=axis)


def _prepare(problem: Problem, plan, q, k, v, q_seg, kv_seg):
  dp = padded_head_dim(problem.head_dim)
  q = to_q_layout(_pad_axis(q, 3, dp), plan)
  k = _pad_axis(_pad_axis(k, 3, dp), 1, plan.tk_pad)
  v = _pad_axis(_pad_axis(v, 3, dp), 1, plan.tk_pad)
  if q_seg is not None:
    q_seg = to_q_layout(q_seg.astype(jnp.int32), plan)
    kv_seg = _pad_axis(kv_seg.astype(jnp.int32), 1, plan.tk_pad)
  return q, k, v, q_seg, kv_seg


def _plans(problem: Problem, backend: str, config: AttentionConfig, dtype=None):
  # dtype: float32 Triton dots need smaller default tiles (config.py);
  # seq_len picks the tuned table's sequence bucket.
  fwd = config.forward or default_forward_config(problem.head_dim, backend, seq_len=problem.tk,
                                                 dtype=dtype)
  bwd = config.backward or default_backward_config(problem.head_dim, backend, seq_len=problem.tk,
                                                   dtype=dtype)
  return fwd, bwd


def _check_launchable(backend: str, interpret: bool, *xs) -> None:
  if backend == "pallas" and interpret and vma.union(*xs) and vma.checking():
    raise ValueError(
        "backend='pallas' in interpret mode (no GPU) cannot run inside jax.shard_map "
        "with check_vma=True: JAX's Pallas interpreter fails the varying-axes check. "
        "Pass check_vma=False to shard_map, or use backend='triton' or 'xla' on CPU "
        "(the compiled GPU Pallas kernels are fine).")


# --------------------------------------------------------------- custom_vjp --

def attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg):
  """Forward of any backend ("xla" too): (out [B,Tq,Hq,D], lse [B,Hq,Tq] f32)."""
  if backend == "xla":
    return reference_attention(problem, q, k, v, q_seg, kv_seg)
  fwd_cfg, _ = _plans(problem, backend, config, q.dtype)
  plan = plan_lib.make_plan(problem, fwd_cfg.block_q, fwd_cfg.block_k)
  qp, kp, vp, qs, ks = _prepare(problem, plan, q, k, v, q_seg, kv_seg)
  _check_launchable(backend, interpret, q, k, v, q_seg, kv_seg)
  out_p, lse_p = batch_folding(backend_module(backend).forward)(
      qp, kp, vp, qs, ks, problem=problem, plan=plan, config=fwd_cfg,
      interpret=interpret)
  out = from_q_layout(out_p, plan)[..., :problem.head_dim]
  lse = from_q_layout(lse_p, plan, axis=2)
  # Inside shard_map: a launch's outputs vary like its inputs.
  axes = vma.union(q, k, v, q_seg, kv_seg)
  return vma.pvary(out, axes), vma.pvary(lse, axes)


def kernel_attention(problem: Problem, backend: str, config: AttentionConfig,
                     interpret: bool, backward: str, q, k, v, q_seg, kv_seg):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq]) through ``backend``'s kernels.

  Inside shard_map, inputs are first marked varying over the union of their
  axes, so each gradient comes back with its input's type (the transpose of
  that marking sums over the axes an input did not vary over).
  """
  axes = vma.union(q, k, v, q_seg, kv_seg)
  q, k, v, q_seg, kv_seg = (vma.pvary(x, axes) for x in (q, k, v, q_seg, kv_seg))
  return _kernel_attention(problem, backend, config, interpret, backward,
                           q, k, v, q_seg, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _kernel_attention(problem: Problem, backend: str, config: AttentionConfig,
                      interpret: bool, backward: str, q, k, v, q_seg, kv_seg):
  return attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg)


def attention_bwd(problem, backend, config, interpret, backward, q, k, v, q_seg,
                  kv_seg, out, lse, dout, dlse):
  """(dq, dk, dv) given out/lse -- which may be the merged result of several
  kv chunks (context-parallel ring): each chunk then gets its exact share.
  ``backward="reference"`` or backend "xla" use the explicit jnp formula."""
  dout = dout.astype(q.dtype)
  dlse = dlse.astype(jnp.float32)
  if backward == "reference" or backend == "xla":
    return reference_backward(problem, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  return _kernel_backward(problem, backend, config, interpret,
                          q, k, v, q_seg, kv_seg, out, lse, dout, dlse)


def _fwd_rule(problem, backend, config, interpret, backward, q, k, v, q_seg, kv_seg):
  out, lse = attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _bwd_rule(problem, backend, config, interpret, backward, res, cts):
  q, k, v, q_seg, kv_seg, out, lse = res
  dout, dlse = cts
  dq, dk, dv = attention_bwd(problem, backend, config, interpret, backward,
                             q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  return dq, dk, dv, None, None


def _kernel_backward(problem, backend, config, interpret, q, k, v, q_seg, kv_seg,
                     out, lse, dout, dlse):
  module = backend_module(backend)
  if not hasattr(module, "backward"):
    raise NotImplementedError(
        f"backend={backend!r} has no backward kernel yet; pass "
        "backward='reference' to differentiate with the reference backward.")
  _, bwd_cfg = _plans(problem, backend, config, q.dtype)
  dq_tiles = bwd_cfg.dq
  bplan = plan_lib.make_backward_plan(problem, bwd_cfg.block_q, bwd_cfg.block_k,
                                      dq_tiles.block_q, dq_tiles.block_k)
  plan = bplan.plan
  qp, kp, vp, qs, ks = _prepare(problem, plan, q, k, v, q_seg, kv_seg)
  dp = qp.shape[-1]
  out_p = to_q_layout(_pad_axis(out, 3, dp), plan)
  dout_p = to_q_layout_zero_padded(_pad_axis(dout, 3, dp), plan)
  lse_p = to_q_layout(lse, plan, axis=2)
  dlse_p = to_q_layout_zero_padded(dlse, plan, axis=2)
  dq_p, dk_p, dv_p = batch_folding(module.backward)(
      qp, kp, vp, qs, ks, out_p, lse_p, dout_p, dlse_p, problem=problem,
      plan=bplan, config=bwd_cfg, interpret=interpret)
  d = problem.head_dim
  dq = from_q_layout(dq_p, plan)[..., :d]
  dk = dk_p[:, :problem.tk, :, :d]
  dv = dv_p[:, :problem.tk, :, :d]
  axes = vma.union(q, k, v, q_seg, kv_seg, dout)
  return tuple(vma.pvary(g.astype(x.dtype), axes) for g, x in ((dq, q), (dk, k), (dv, v)))


_kernel_attention.defvjp(_fwd_rule, _bwd_rule)
