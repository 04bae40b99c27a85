"""local_attention: a ContextParallel spec on this device's zigzag shards
(inside shard_map), handed to its strategy's module.

Every strategy takes ``(problem, axis_name, run, q, k, v, qs, ks)`` on the
local shards and returns this device's (out, lse); 2-D composes Ulysses with
one of them (``two_d``).
"""

from __future__ import annotations

from jax_grouped_attn import validate
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.cp.allgather import allgather_attention
from jax_grouped_attn.cp.ring import ring_attention
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.cp.spec import ContextParallel, TwoD
from jax_grouped_attn.cp.two_d import two_d_attention
from jax_grouped_attn.cp.ulysses import ulysses_attention
from jax_grouped_attn.plan import Problem

STRATEGY_FNS = {"allgather": allgather_attention, "ring": ring_attention,
                "ulysses": ulysses_attention}


def local_attention(problem: Problem, cp: ContextParallel, kernels: Kernels, q, k, v,
                    q_segment_ids, kv_segment_ids):
  """Context-parallel attention of the local zigzag shards (inside shard_map).

  q: [B, 2c, Hq, D], k, v: [B, 2c, Hk, D], segment ids [B, 2c] int (or None):
  this device's shard, described (and validated) by ``problem`` as one
  self-attention group; ``kernels`` is the API's resolved choice. Returns
  (out [B, 2c, Hq, D], lse [B, Hq, 2c] f32).
  """
  run = Run(kernels)
  validate.check_context_parallel_shards(q, k, 1, None)   # Ulysses checks its heads itself
  comp = cp.composition
  if isinstance(comp, TwoD):
    return two_d_attention(problem, comp, run, q, k, v, q_segment_ids, kv_segment_ids)
  return STRATEGY_FNS[comp.name](problem, comp.axis_name, run, q, k, v, q_segment_ids,
                                 kv_segment_ids)
