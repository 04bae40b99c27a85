"""Strategy "ulysses": all-to-all from sequence to head sharding and back.

Inside shard_map over ``axis_name`` (W devices), an all-to-all gives each
device the whole sequence for Hq/W query heads and their kv heads;
``zigzag_unpermute`` restores natural order, ONE causal kernel runs, and the
inverse all-to-all returns this device's zigzag shard of every head. Needs
Hq % W == 0; kv heads are split when Hk % W == 0, else repeated first
(:func:`kv_head_repeats`). Gradients are JAX's transpose of the all-to-alls
around the kernel's custom_vjp. Memory O(2c) like the ring; 4 all-to-alls of
q/k/v/out-sized tensors per pass.

A mask that compares positions (causal or a window) needs the natural order;
without one, any order will do and the unpermute is skipped. ``cp.two_d``
runs another strategy in place of the one kernel (``inner=``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax_grouped_attn import validate
from jax_grouped_attn.cp.axes import axis_size_and_rank
from jax_grouped_attn.cp.layout import positional
from jax_grouped_attn.cp.permute import zigzag_permute, zigzag_unpermute
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem


def kv_head_repeats(hk: int, world: int) -> int:
  """How often Ulysses repeats each kv head so ``world`` equal, contiguous
  query-head slices each get whole kv heads: 1 when Hk % W == 0, else
  W / gcd(Hk, W). Then Hk * r = lcm(Hk, W), which divides Hq (a multiple of
  both), and query head h still reads repeated head h // (Hq / (Hk * r)),
  a copy of its kv head h // (Hq / Hk)."""
  return world // math.gcd(hk, world)


def ulysses_to_heads(x, axis_name, world: int, ordered: bool):
  """Local zigzag shard [B, 2c, H, D] -> [B, W*2c, H/W, D]: this device's head
  slice over the 2W chunks of its group, in natural order when ``ordered``."""
  x = jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True)
  return zigzag_unpermute(x, world, axis=1) if ordered else x


def ulysses_to_sequence(x, axis_name, world: int, ordered: bool, seq_axis=1, head_axis=2):
  """Inverse of :func:`ulysses_to_heads` (``seq_axis=2, head_axis=1`` for lse)."""
  if ordered:
    x = zigzag_permute(x, world, axis=seq_axis)
  return jax.lax.all_to_all(x, axis_name, seq_axis, head_axis, tiled=True)


def ulysses_attention(problem: Problem, axis_name, run: Run, q, k, v, qs, ks, inner=None):
  """Attention of the local zigzag shards q [B, 2c, Hq, D], k, v [B, 2c, Hk, D]
  (segment ids [B, 2c] or None) over ``axis_name``: (out [B, 2c, Hq, D],
  lse [B, Hq, 2c] f32).

  ``inner(problem, q, k, v, qs, ks) -> (out, lse)`` attends the head-sharded
  [B, W*2c, Hq/W, D] tensors (natural order when the mask is positional);
  None: one grouped launch of ``run``.
  """
  world = axis_size_and_rank(axis_name)[0]
  validate.check_context_parallel_shards(q, k, world, axis_name)   # Hq % W == 0
  ordered = positional(problem.causal, problem.window)
  reps = kv_head_repeats(problem.hk, world)
  if reps > 1:   # GQA with Hk % W != 0: whole kv heads per query-head slice
    k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
  heads = lambda x: ulysses_to_heads(x, axis_name, world, ordered)
  q, k, v = heads(q), heads(k), heads(v)

  def gather(ids):
    ids = jax.lax.all_gather(ids, axis_name, axis=1, tiled=True)
    return zigzag_unpermute(ids, world, axis=1) if ordered else ids

  if qs is not None:
    same = qs is ks   # segment_ids=: gather once
    qs = gather(qs)
    ks = qs if same else gather(ks)
  t = q.shape[1]
  gathered = dataclasses.replace(problem, groups=(QueryGroup(0, t, 0, t),), tq=t, tk=t,
                                 hq=q.shape[2], hk=k.shape[2])
  out, lse = (inner or run.launch)(gathered, q, k, v, qs, ks)
  out = ulysses_to_sequence(out, axis_name, world, ordered)
  lse = ulysses_to_sequence(lse, axis_name, world, ordered, seq_axis=2, head_axis=1)
  return out, lse
