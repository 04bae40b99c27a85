"""The one custom_vjp wiring shared by every kernel backend.

:func:`attention` runs a registry entry's forward under a ``custom_vjp`` whose
backward is an entry's backward (``backend``: one entry name for both passes,
or a (forward, backward) pair -- they share the out/lse residual contract)
(or, with ``backward="reference"``, the reference formula, for isolating
kernel bugs). An entry whose forward JAX can differentiate exactly
(``native_autodiff``, the reference) runs as is.
Residuals are q, k, v, out, lse (and segment ids): nothing O(T^2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_grouped_attn import registry, vma
from jax_grouped_attn.config import AttentionConfig
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_backward


def passes(backend) -> tuple[str, str]:
  """(forward entry, backward entry) of ``backend``: a name or a pair of names."""
  return (backend, backend) if isinstance(backend, str) else tuple(backend)


def attention_fwd(problem: Problem, backend, config: AttentionConfig, interpret: bool,
                  q, k, v, q_seg, kv_seg):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq] f32) of ``backend``'s forward, no vjp."""
  entry = registry.get(passes(backend)[0])
  entry.check_launchable(problem, q.dtype, interpret, q, k, v, q_seg, kv_seg)
  cfg = registry.config_for(entry, "forward", problem, q.dtype, config)
  return entry.forward(problem, cfg, interpret, q, k, v, q_seg, kv_seg)


def attention_bwd(problem: Problem, backend, config: AttentionConfig, interpret: bool,
                  backward: str, q, k, v, q_seg, kv_seg, out, lse, dout, dlse):
  """(dq, dk, dv) given out/lse -- which may be the merged result of several
  kv chunks (context-parallel ring): each chunk then gets its exact share."""
  dout = dout.astype(q.dtype)
  dlse = dlse.astype(jnp.float32)
  if backward == "reference":
    return reference_backward(problem, q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  entry = registry.get(passes(backend)[1])
  cfg = registry.config_for(entry, "backward", problem, q.dtype, config)
  return entry.backward(problem, cfg, interpret, q, k, v, q_seg, kv_seg, out, lse,
                        dout, dlse)


def attention(problem: Problem, backend, config: AttentionConfig, interpret: bool,
              backward: str, q, k, v, q_seg, kv_seg):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq] f32), differentiable.

  Inside shard_map, inputs are first marked varying over the union of their
  axes, so each gradient comes back with its input's type (the transpose of
  that marking sums over the axes an input did not vary over).
  """
  fwd, bwd = passes(backend)
  if fwd == bwd and registry.get(fwd).native_autodiff and backward == "kernel":
    return attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg)
  axes = vma.union(q, k, v, q_seg, kv_seg)
  q, k, v, q_seg, kv_seg = (vma.pvary(x, axes) for x in (q, k, v, q_seg, kv_seg))
  return _attention(problem, backend, config, interpret, backward, q, k, v, q_seg, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _attention(problem, backend, config, interpret, backward, q, k, v, q_seg, kv_seg):
  return attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg)


def _fwd_rule(problem, backend, config, interpret, backward, q, k, v, q_seg, kv_seg):
  out, lse = attention_fwd(problem, backend, config, interpret, q, k, v, q_seg, kv_seg)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _bwd_rule(problem, backend, config, interpret, backward, res, cts):
  q, k, v, q_seg, kv_seg, out, lse = res
  dout, dlse = cts
  dq, dk, dv = attention_bwd(problem, backend, config, interpret, backward,
                             q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
  return dq, dk, dv, None, None


_attention.defvjp(_fwd_rule, _bwd_rule)
