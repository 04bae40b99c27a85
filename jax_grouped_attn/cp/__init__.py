"""Zigzag context parallelism: exact attention over a sequence sharded on mesh axes.

Inside ``jax.shard_map``, with the sequence axis (axis 1) of q, k, v sharded
over ``cp.sequence_axes`` in zigzag order (``zigzag_permute``), every device
holds 2c tokens -- chunks r and 2W-1-r of 2W -- and calls
``attention(q, k, v, causal=..., context_parallel=cp)``;
``context_parallel_attention`` does the sharding for global arrays.

One module per room:
  spec           ContextParallel and the composition it stands for
  layout         the zigzag layout's index geometry (no JAX)
  permute        arrays to and from zigzag order, keeping their sharding
  allgather      strategy "allgather": gather K, V, one grouped kernel
  ulysses        strategy "ulysses": all-to-all to head sharding and back
  ring_schedule  the ring's static plan: calls, rows, skipped steps (no JAX;
                 the module, not its function of that name, is cp.ring_schedule)
  ring           strategy "ring": ppermutes, log-sum-exp merge, custom_vjp
  two_d          2-D: Ulysses around allgather or ring
  local          local_attention: a spec on local shards -> its strategy
  global_arrays  context_parallel_attention on global natural-order arrays
  axes, run      axis size/rank and shard_map; the resolved kernel choice
"""

from jax_grouped_attn.cp.axes import axis_size_and_rank, shard_map
from jax_grouped_attn.cp.layout import (
  zigzag_chunks,
  zigzag_groups,
  zigzag_inverse_order,
  zigzag_order,
  zigzag_positions,
)
from jax_grouped_attn.cp.local import local_attention
from jax_grouped_attn.cp.permute import shuffle_shard, zigzag_permute, zigzag_unpermute
from jax_grouped_attn.cp.ring import merge_partials
from jax_grouped_attn.cp.ring_schedule import (
  RingSegment,
  RingStep,
  ring_steps,
  zigzag_ring_calls,
  zigzag_ring_step,
)
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.cp.spec import STRATEGIES, ContextParallel, Strategy, TwoD
from jax_grouped_attn.cp.ulysses import kv_head_repeats, ulysses_to_heads, ulysses_to_sequence

__all__ = [
    "STRATEGIES", "ContextParallel", "RingSegment", "RingStep", "Run", "Strategy", "TwoD",
    "axis_size_and_rank", "kv_head_repeats", "local_attention",
    "merge_partials", "ring_steps", "shard_map", "shuffle_shard",
    "ulysses_to_heads", "ulysses_to_sequence", "zigzag_chunks", "zigzag_groups",
    "zigzag_inverse_order", "zigzag_order", "zigzag_permute", "zigzag_positions",
    "zigzag_ring_calls", "zigzag_ring_step", "zigzag_unpermute",
]
