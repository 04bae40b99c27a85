"""The one custom_vjp wiring shared by every kernel backend.

:func:`differentiable` runs ``kernels.forward``'s forward under a ``custom_vjp``
whose backward is ``kernels.backward``'s (or, with ``kernels.mode ==
"reference"``, the reference formula, for isolating kernel bugs). An entry
whose forward JAX can differentiate exactly (``native_autodiff``, the
reference) runs as is. Residuals are q, k, v, out, lse (and segment ids):
nothing O(T^2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_grouped_attn import registry, vma
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_backward


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
  cfg = registry.config_for(entry, "backward", problem, q.dtype, kernels.config)
  return entry.backward(problem, cfg, kernels.interpret, q, k, v, q_seg, kv_seg, out, lse,
                        dout, dlse)


def differentiable(problem: Problem, kernels: Kernels, q, k, v, q_seg, kv_seg):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq] f32), differentiable.

  Inside shard_map, inputs are first marked varying over the union of their
  axes, so each gradient comes back with its input's type (the transpose of
  that marking sums over the axes an input did not vary over).
  """
  if (kernels.forward == kernels.backward and kernels.mode == "kernel"
      and registry.get(kernels.forward).native_autodiff):
    return forward(problem, kernels, q, k, v, q_seg, kv_seg)
  axes = vma.union(q, k, v, q_seg, kv_seg)
  q, k, v, q_seg, kv_seg = (vma.pvary(x, axes) for x in (q, k, v, q_seg, kv_seg))
  return _differentiable(problem, kernels, q, k, v, q_seg, kv_seg)


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
