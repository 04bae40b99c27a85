"""2-D context parallelism: Ulysses over inner axes around "allgather" or
"ring" over outer ones (``spec.TwoD``).

The sequence is sharded over ``(*outer axes, *ulysses axes)`` flattened
outer-major, W = W_out * W_in. Ulysses over the inner axis gathers the
2 * W_in chunks of an outer group; in zigzag(W_in) order they are exactly the
zigzag(W_out) shard of that group (chunks o and 2*W_out-1-o of 2*W_out), so
after ``zigzag_unpermute(., W_in)`` the outer strategy runs unchanged on
W_in * 2c tokens and Hq / W_in heads. Plain "ulysses" is the case W_out = 1,
where that shard is the whole sequence in natural order.
"""

from __future__ import annotations

from jax_grouped_attn.cp.allgather import allgather_attention
from jax_grouped_attn.cp.ring import ring_attention
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.cp.spec import TwoD
from jax_grouped_attn.cp.ulysses import ulysses_attention
from jax_grouped_attn.plan import Problem

OUTER = {"allgather": allgather_attention, "ring": ring_attention}


def two_d_attention(problem: Problem, two_d: TwoD, run: Run, q, k, v, qs, ks):
  """Attention of the local zigzag shards (as in ``ulysses_attention``) with
  ``two_d.outer`` run on each Ulysses group's gathered tokens."""
  outer = OUTER[two_d.outer.name]
  inner = lambda p, q, k, v, qs, ks: outer(p, two_d.outer.axis_name, run, q, k, v, qs, ks)
  return ulysses_attention(problem, two_d.ulysses_axis_name, run, q, k, v, qs, ks, inner=inner)
