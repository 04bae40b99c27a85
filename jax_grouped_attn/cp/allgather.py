"""Strategy "allgather": gather K, V once, run ONE grouped kernel.

Inside shard_map over ``axis_name`` (W devices), each device all-gathers K, V
(and the kv segment ids), restores natural order and attends its two zigzag
chunks as two query groups (``layout.zigzag_groups(rank, W, c)``). The rank
is traced but groups are static, so the rank-dependent choice is a
``lax.switch`` over W compiled grouped kernels. Its backward is the grouped
kernel's custom_vjp; the all-gather's transpose is a reduce-scatter of dK, dV
back to the zigzag shards. Memory O(W * 2c) for the gathered K, V.

A sliding window compares global positions, like causal: the kernel runs on
true positions and skips the kv blocks outside each group's window.
Non-causal attention without a window needs no switch (nor the unpermute:
every row sees every key, so the key order does not matter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from jax_grouped_attn.cp.axes import axis_size_and_rank
from jax_grouped_attn.cp.layout import positional, zigzag_groups
from jax_grouped_attn.cp.permute import zigzag_unpermute
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem


def allgather_attention(problem: Problem, axis_name, run: Run, q, k, v, qs, ks):
  """Attention of the local zigzag shards q [B, 2c, Hq, D], k, v [B, 2c, Hk, D]
  (segment ids [B, 2c] or None) over ``axis_name``: (out [B, 2c, Hq, D],
  lse [B, Hq, 2c] f32)."""
  world, rank = axis_size_and_rank(axis_name)
  t = q.shape[1]
  c, s = t // 2, world * t
  gather = lambda x: None if x is None else jax.lax.all_gather(
      x, axis_name, axis=1, tiled=True)
  k_all, v_all, ks_all = gather(k), gather(v), gather(ks)

  def call(groups, q, k, v, qs, ks):
    return run.launch(dataclasses.replace(problem, groups=groups, tk=s), q, k, v, qs, ks)

  if not positional(problem.causal, problem.window):
    # Every row sees every key: the gathered (zigzag) key order is as good as
    # the natural one, so skip the unpermute and the rank switch.
    return call((QueryGroup(0, t, 0, s),), q, k_all, v_all, qs, ks_all)
  # The positions of the local rows differ by rank; the kernel skips the kv
  # blocks outside each group's (causal, window) range itself. All of K, V is
  # still gathered: the two local chunks need keys near both ends.
  unperm = lambda x: None if x is None else zigzag_unpermute(x, world, axis=1)
  k_all, v_all, ks_all = unperm(k_all), unperm(v_all), unperm(ks_all)

  def groups(r):
    g = zigzag_groups(r, world, c)
    # Non-causal (with a window): every group may look past its chunk.
    return g if problem.causal else tuple(dataclasses.replace(x, kv_len=s) for x in g)

  if world == 1:
    return call(groups(0), q, k_all, v_all, qs, ks_all)
  branches = [functools.partial(call, groups(r)) for r in range(world)]
  return jax.lax.switch(rank, branches, q, k_all, v_all, qs, ks_all)
