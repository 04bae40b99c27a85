"""Attention sinks (gpt-oss): one extra logit per query head that has no value.

``p_j = exp(s_j) / (exp(sinks[h]) + sum_j exp(s_j))`` and ``out = sum_j p_j v_j``
is attention over the keys merged by log-sum-exp with a part whose lse is
``sinks[h]`` and whose output is 0. So the sink is applied once to the (out,
lse) of a finished attention, whatever computed it (any backend, any
context-parallel strategy: after the ring's merge, so exactly once). On one
device the kernels' backward is handed the merged out and lse
(jax_grouped_attn/autodiff.py: exact dq, dk, dv; d sinks[h] = sum over rows of
p_sink (dlse - delta), delta = rowsum(dO * O)); after a context-parallel
strategy JAX differentiates the merge. The cost is one elementwise pass over out.
"""

from __future__ import annotations

import jax.numpy as jnp


def check_sinks(sinks, hq: int, name: str = "sinks"):
  """None, or a floating array of shape [Hq] (traced is fine: it is learned)."""
  if sinks is None:
    return None
  shape = getattr(sinks, "shape", None)
  dtype = getattr(sinks, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{name} must be None or a float array of shape [Hq]={hq}, got "
                    f"{type(sinks).__name__}.")
  if tuple(shape) != (hq,):
    raise ValueError(f"{name} must have shape [Hq] = ({hq},) (one logit per query head), "
                     f"got {name}.shape={tuple(shape)}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array (float32 is the learned dtype), "
                    f"got {name}.dtype={dtype}.")
  return sinks


def with_sinks(out, lse, sinks):
  """(out [B, T, H, D], lse [B, H, T] f32) over the keys -> the same with the sink
  logit ``sinks`` [H] in every row's softmax. A row that saw no key (lse -inf)
  gets out 0 and lse ``sinks[h]``."""
  if sinks is None:
    return out, lse
  s = sinks.astype(jnp.float32)[None, :, None]             # [1, H, 1]
  total = jnp.logaddexp(lse, s)
  keep = jnp.exp(lse - total)                              # [B, H, T], 0 where lse = -inf
  scaled = out.astype(jnp.float32) * jnp.swapaxes(keep, 1, 2)[..., None]
  return scaled.astype(out.dtype), total

