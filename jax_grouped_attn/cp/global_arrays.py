"""context_parallel_attention: context parallelism of GLOBAL arrays in natural order.

One jitted ``shard_map`` (cached per static arguments): each natural-order
shard moves to zigzag order (``permute.shuffle_shard``: two ppermutes), runs
``local_attention`` and moves back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_grouped_attn import registry, validate
from jax_grouped_attn.config import as_attention_config
from jax_grouped_attn.cp.axes import shard_map
from jax_grouped_attn.cp.local import local_attention
from jax_grouped_attn.cp.permute import has_axis_type, shuffle_shard
from jax_grouped_attn.cp.spec import ContextParallel
from jax_grouped_attn.groups import QueryGroup


def context_parallel_attention(q, k, v, mesh, axis_name, *, strategy="allgather",
                               ulysses_axis_name=None, causal=False, softmax_scale=None,
                               segment_ids=None, q_segment_ids=None, kv_segment_ids=None,
                               batch_axis_name=None, backend="auto",
                               return_lse=False, config=None, interpret=None,
                               backward="kernel", local_window_size=None):
  """Zigzag context-parallel self-attention of GLOBAL arrays in natural order.

  Shards the sequence (axis 1) over mesh axes ``cp.sequence_axes`` (and the
  batch over ``batch_axis_name`` if given) in natural order; inside
  ``jax.shard_map`` moves each shard to zigzag order (two ``ppermute``s), runs
  ``attention(..., context_parallel=cp)`` with ``cp = ContextParallel(axis_name,
  strategy, ulysses_axis_name)`` and moves the result back.

  Works on meshes with Auto or Explicit axes (``jax.make_mesh``'s default in
  new JAX). On Explicit axes the inputs are resharded to
  ``P(batch_axis_name, cp.sequence_axes)``, and ``out`` keeps that sharding
  (``lse``: ``P(batch_axis_name, None, cp.sequence_axes)``). JAX itself wants eager
  differentiation on Explicit axes inside ``with jax.set_mesh(mesh):``
  (jitted code does not need it).

  Args:
    q: [B, S, Hq, D]; k, v: [B, S, Hk, D]; S divisible by 2 * W, W the product
      of the sizes of ``axis_name`` (and ``ulysses_axis_name``) on ``mesh``.
    strategy, ulysses_axis_name: as in :class:`ContextParallel`.
    segment_ids / q_segment_ids / kv_segment_ids: [B, S] int (as in ``attention``).
    local_window_size: sliding window over sequence positions, as in
      :func:`jax_grouped_attn.attention`.
    Other arguments as in :func:`jax_grouped_attn.attention`.

  Returns:
    out [B, S, Hq, D] (natural order), or (out, lse [B, Hq, S] f32).
  """
  cp = ContextParallel(axis_name, strategy, ulysses_axis_name)
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  validate.check_context_parallel_global(q, k, v, mesh.shape, cp.sequence_axes,
                                         batch_axis_name)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    q_segment_ids = kv_segment_ids = segment_ids
  # Validated once, on the global arrays; the shard_map body trusts them.
  s_len = q.shape[1]
  problem = validate.make_problem(
      q, k, v, (QueryGroup(0, s_len, 0, s_len),), causal=causal, softmax_scale=softmax_scale,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      local_window_size=local_window_size)
  return_lse = validate.check_bool("return_lse", return_lse)
  backward = validate.check_backward_mode(backward)
  cfg = as_attention_config(config)
  entries, interp = registry.resolve(backend, interpret, cfg, problem, q.dtype)
  registry.check_config(entries, cfg)
  names = tuple(e.name for e in entries)
  args = [q, k, v] + ([q_segment_ids, kv_segment_ids] if q_segment_ids is not None else [])
  # Some interpreters fail shard_map's varying-axes check (Backend.interpret_vma).
  key = (mesh, cp, batch_axis_name, len(args), problem, names, cfg, interp, backward,
         all(e.interpret_vma for e in entries) or not interp)
  try:
    hash(key)
  except TypeError:   # an unhashable argument: build it uncached
    fn = _sharded_attention.__wrapped__(*key)
  else:
    fn = _sharded_attention(*key)
  out, lse = fn(*args)
  return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _sharded_attention(mesh, cp, batch_axis_name, n_args, problem, backend, config,
                       interpret, backward, check_vma):
  """The jitted shard_map of context_parallel_attention (cached, so eager
  calls compile once): global natural-order arrays -> (out, lse)."""
  axes = cp.sequence_axes
  world = int(np.prod([mesh.shape[n] for n in axes]))
  axis = axes if len(axes) > 1 else axes[0]
  seq = P(batch_axis_name, axis)
  shuffle = lambda x, dim=1, inverse=False: shuffle_shard(x, axis, world, dim,
                                                          inverse=inverse)

  def body(*shards):   # natural-order shards in and out; zigzag in between
    q, k, v, *segments = (shuffle(x) for x in shards)
    qs, ks = segments or (None, None)
    b, t = q.shape[:2]
    local = dataclasses.replace(problem, groups=(QueryGroup(0, t, 0, t),), batch=b, tq=t, tk=t)
    out, lse = local_attention(local, cp, backend, config, interpret, backward, q, k, v,
                               qs, ks)
    return shuffle(out, inverse=True), shuffle(lse, dim=2, inverse=True)

  fn = shard_map(body, mesh, (seq,) * n_args, (seq, P(batch_axis_name, None, axis)),
                 check_vma=check_vma)
  if not has_axis_type(mesh, "Explicit"):
    return jax.jit(fn)
  sharding = jax.sharding.NamedSharding(mesh, seq)
  # shard_map takes arrays typed with its in_specs on Explicit axes.
  return jax.jit(lambda *args: fn(*(jax.sharding.reshard(x, sharding) for x in args)))
