"""The one custom_vjp wiring shared by every kernel backend.

:func:`differentiable` runs ``kernels.forward``'s forward under a ``custom_vjp``
whose backward is ``kernels.backward``'s (or, with ``kernels.mode ==
"reference"``, the reference formula, for isolating kernel bugs). An entry
whose forward JAX can differentiate exactly (``native_autodiff``, the
reference) runs as is. Residuals are q, k, v, out, lse (and segment ids):
nothing O(T^2).

With ``sinks`` (jax_grouped_attn/sinks.py) the kernels' backward is handed the
out and lse *with* the sink, which gives exact dq, dk, dv directly (the
identity the ring relies on), and d sinks[h] = -sum over rows of p_sink *
delta, delta = rowsum(dO * O) - dlse. Autodiff through the merge instead would
hand the kernels dO * exp(lse - lse_sink), rounded to the input dtype: at
S8192 bf16 that raised dV's error by 40% over the calibrated budget (H200).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_grouped_attn import registry, vma
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_backward
from jax_grouped_attn.sinks import with_sinks


def forward(problem: Problem, kernels: Kernels, q, k, v, q_seg, kv_seg):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq] f32) of the forward entry, no vjp."""
  entry = registry.get(kernels.forward)
  entry.check_launchable(problem, q.dtype, kernels.interpret, q, k, v, q_seg, kv_seg)
  cfg = registry.config_for(entry, "forward", problem, q.dtype, kernels.config)
  return entry.forward(problem, cfg, kernels.interpret, q, k, v, q_seg, kv_seg)


def backward(problem: Problem, kernels: Kernels, q, k, v, q_seg, kv_seg, out, lse, dout,
             dlse):
  """(dq, dk, dv) given out/lse -- which may be the merged result of several
  kv chunks (context-parallel ring): each chunk then gets its exact share."""
  dout = dout.astype(q.dtype)
  dlse = dlse.astype(jnp.float32)
  if kernels.mode == "reference":
    return reference_backward(problem, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  entry = registry.get(kernels.backward)
  cfg = registry.config_for(entry, "backward", problem, q.dtype, kernels.config,
                            deterministic=kernels.deterministic)
  return entry.backward(problem, cfg, kernels.interpret, q, k, v, q_seg, kv_seg, out, lse,
                        dout, dlse)


def differentiable(problem: Problem, kernels: Kernels, q, k, v, q_seg, kv_seg, sinks=None):
  """(out [B, Tq, Hq, Dv], lse [B, Hq, Tq] f32), differentiable; ``sinks``: None
  or [Hq] floating, in the softmax (and the lse) of every row.

  Inside shard_map, inputs are first marked varying over the union of their
  axes, so each gradient comes back with its input's type (the transpose of
  that marking sums over the axes an input did not vary over).
  """
  if (kernels.forward == kernels.backward and kernels.mode == "kernel"
      and registry.get(kernels.forward).native_autodiff):
    return with_sinks(*forward(problem, kernels, q, k, v, q_seg, kv_seg), sinks)
  axes = vma.union(q, k, v, q_seg, kv_seg, sinks)
  q, k, v, q_seg, kv_seg, sinks = (vma.pvary(x, axes) for x in (q, k, v, q_seg, kv_seg, sinks))
  if sinks is None:
    return _differentiable(problem, kernels, q, k, v, q_seg, kv_seg)
  return _differentiable_sinks(problem, kernels, q, k, v, q_seg, kv_seg, sinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable(problem, kernels, q, k, v, q_seg, kv_seg):
  return forward(problem, kernels, q, k, v, q_seg, kv_seg)


def _fwd_rule(problem, kernels, q, k, v, q_seg, kv_seg):
  out, lse = forward(problem, kernels, q, k, v, q_seg, kv_seg)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _bwd_rule(problem, kernels, res, cts):
  q, k, v, q_seg, kv_seg, out, lse = res
  dout, dlse = cts
  dq, dk, dv = backward(problem, kernels, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  return dq, dk, dv, None, None


_differentiable.defvjp(_fwd_rule, _bwd_rule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable_sinks(problem, kernels, q, k, v, q_seg, kv_seg, sinks):
  return _sinks_fwd_rule(problem, kernels, q, k, v, q_seg, kv_seg, sinks)[0]


def _sinks_fwd_rule(problem, kernels, q, k, v, q_seg, kv_seg, sinks):
  out, lse = with_sinks(*forward(problem, kernels, q, k, v, q_seg, kv_seg), sinks)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse, sinks)


def _sinks_bwd_rule(problem, kernels, res, cts):
  q, k, v, q_seg, kv_seg, out, lse, sinks = res   # out, lse with the sink
  dout, dlse = cts
  dq, dk, dv = backward(problem, kernels, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  f32 = lambda x: x.astype(jnp.float32)
  delta = jnp.einsum("bthd,bthd->bht", f32(out), f32(dout)) - f32(dlse)   # [B, Hq, Tq]
  p_sink = jnp.exp(f32(sinks)[None, :, None] - lse)
  dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))
  return dq, dk, dv, None, None, dsinks.astype(sinks.dtype)


_differentiable_sinks.defvjp(_sinks_fwd_rule, _sinks_bwd_rule)
