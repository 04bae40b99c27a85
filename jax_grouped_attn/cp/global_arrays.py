"""Context parallelism of GLOBAL arrays in natural order (api.context_parallel_attention).

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

from jax_grouped_attn import registry
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.cp.axes import shard_map
from jax_grouped_attn.cp.local import local_attention
from jax_grouped_attn.cp.permute import has_axis_type, shuffle_shard
from jax_grouped_attn.cp.spec import ContextParallel
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem


def global_attention(problem: Problem, cp: ContextParallel, kernels: Kernels, mesh,
                     batch_axis_name, q, k, v, q_segment_ids, kv_segment_ids):
  """(out [B, S, Hq, D], lse [B, Hq, S] f32) of validated global natural-order
  arrays (``problem`` describes them whole) over ``mesh``."""
  args = [q, k, v] + ([q_segment_ids, kv_segment_ids] if q_segment_ids is not None else [])
  entries = {registry.get(kernels.forward), registry.get(kernels.backward)}
  # Some interpreters fail shard_map's varying-axes check (Backend.interpret_vma).
  check_vma = all(e.interpret_vma for e in entries) or not kernels.interpret
  key = (mesh, cp, batch_axis_name, len(args), problem, kernels, check_vma)
  try:
    hash(key)
  except TypeError:   # an unhashable argument: build it uncached
    fn = _sharded_attention.__wrapped__(*key)
  else:
    fn = _sharded_attention(*key)
  return fn(*args)


@functools.lru_cache(maxsize=64)
def _sharded_attention(mesh, cp, batch_axis_name, n_args, problem, kernels, check_vma):
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
    out, lse = local_attention(local, cp, kernels, q, k, v, qs, ks)
    return shuffle(out, inverse=True), shuffle(lse, dim=2, inverse=True)

  fn = shard_map(body, mesh, (seq,) * n_args, (seq, P(batch_axis_name, None, axis)),
                 check_vma=check_vma)
  if not has_axis_type(mesh, "Explicit"):
    return jax.jit(fn)
  sharding = jax.sharding.NamedSharding(mesh, seq)
  # shard_map takes arrays typed with its in_specs on Explicit axes.
  return jax.jit(lambda *args: fn(*(jax.sharding.reshard(x, sharding) for x in args)))
