"""Zigzag (Llama-3 style) context-parallel index math, in one place.

A sequence of length S is cut into 2W chunks of c = S / (2W) tokens. Device
r of W holds chunks r and 2W-1-r, so every device gets one early (cheap under
causal masking) and one late (expensive) chunk::

    W = 2, chunks 0 1 2 3:   device 0 holds [0, 3], device 1 holds [1, 2]

Everything here is pure Python/numpy on static ints, except that
:func:`zigzag_permute` / :func:`zigzag_unpermute` apply the static permutation
to an array (reshapes and a flip).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.groups import QueryGroup


def _check_rank(rank: int, world_size: int) -> None:
  if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
    raise ValueError(f"world_size must be a positive int, got {world_size=}.")
  if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
    raise ValueError(f"rank must be an int in [0, {world_size}), got {rank=}.")


def zigzag_chunks(rank: int, world_size: int) -> tuple[int, int]:
  """The two chunk indices (of 2*world_size) held by ``rank``."""
  _check_rank(rank, world_size)
  return rank, 2 * world_size - 1 - rank


def zigzag_groups(rank: int, world_size: int, chunk_len: int) -> tuple[QueryGroup, QueryGroup]:
  """The two query groups of ``rank`` attending to the full, contiguous K,V.

  Local q is ``[chunk rank; chunk 2W-1-rank]`` (2*chunk_len rows). Group 0 sees
  keys up to the end of chunk ``rank``; group 1 up to the end of chunk
  ``2W-1-rank``; both causal with their chunk's start as position offset.
  """
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len must be a positive int, got {chunk_len=}.")
  lo, hi = zigzag_chunks(rank, world_size)
  c = chunk_len
  return (QueryGroup(0, c, lo * c, (lo + 1) * c),
          QueryGroup(c, c, hi * c, (hi + 1) * c))


def zigzag_order(seq_len: int, world_size: int) -> np.ndarray:
  """Permutation ``perm`` with ``x_zigzag = x[perm]``: device r's shard is
  ``x_zigzag[r*2c:(r+1)*2c]``, i.e. chunks r and 2W-1-r of x."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len=}.")
  _check_rank(0, world_size)
  if seq_len % (2 * world_size):
    raise ValueError(
        f"{seq_len=} must be divisible by 2*world_size={2 * world_size} for "
        "the zigzag layout; pad the sequence first.")
  c = seq_len // (2 * world_size)
  chunks = []
  for r in range(world_size):
    lo, hi = zigzag_chunks(r, world_size)
    chunks += [np.arange(lo * c, (lo + 1) * c), np.arange(hi * c, (hi + 1) * c)]
  return np.concatenate(chunks)


def zigzag_positions(seq_len: int, world_size: int) -> np.ndarray:
  """Sequence position of each token in zigzag order: shape [seq_len], int32.

  Device r's slice ``[r*2c:(r+1)*2c]`` gives the positions of its local tokens
  (use them for RoPE)."""
  return zigzag_order(seq_len, world_size).astype(np.int32)


def zigzag_inverse_order(seq_len: int, world_size: int) -> np.ndarray:
  """Inverse of :func:`zigzag_order`: ``x = x_zigzag[inverse]``."""
  perm = zigzag_order(seq_len, world_size)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(seq_len)
  return inv


def _check_seq_axis(x, world_size: int, axis: int) -> int:
  if not hasattr(x, "shape") or not hasattr(x, "ndim"):
    raise TypeError(f"x must be an array, got {type(x).__name__}.")
  if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{axis=} is out of range for {x.shape=}.")
  if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
    raise ValueError(f"world_size must be a positive int, got {world_size=}.")
  length = x.shape[axis]
  if length % (2 * world_size):
    raise ValueError(
        f"{x.shape=}: the sequence length {length} (axis {axis}) must be "
        f"divisible by 2*world_size={2 * world_size} for the zigzag layout; "
        "pad the sequence first.")
  return length


def zigzag_permute(x, world_size: int, axis: int = 1):
  """Natural order -> zigzag order along ``axis`` (the permutation
  :func:`zigzag_order`). Shard the result evenly over ``world_size`` devices:
  device r gets chunks r and 2W-1-r. Use it for q, k, v and segment ids."""
  length = _check_seq_axis(x, world_size, axis)
  axis, w = axis % x.ndim, world_size
  # Reshapes, a flip and a stack (not a gather): under autodiff the transpose
  # stays a copy instead of a scatter-add.
  xs = jnp.reshape(x, x.shape[:axis] + (2, w, length // (2 * w)) + x.shape[axis + 1:])
  lo = jax.lax.index_in_dim(xs, 0, axis, keepdims=False)             # chunks 0..W-1
  hi = jnp.flip(jax.lax.index_in_dim(xs, 1, axis, keepdims=False), axis)  # 2W-1..W
  return jnp.reshape(jnp.stack([lo, hi], axis=axis + 1), x.shape)


def zigzag_unpermute(x, world_size: int, axis: int = 1):
  """Inverse of :func:`zigzag_permute`: zigzag order -> natural order along ``axis``."""
  length = _check_seq_axis(x, world_size, axis)
  axis, w = axis % x.ndim, world_size
  xs = jnp.reshape(x, x.shape[:axis] + (w, 2, length // (2 * w)) + x.shape[axis + 1:])
  lo = jax.lax.index_in_dim(xs, 0, axis + 1, keepdims=False)
  hi = jnp.flip(jax.lax.index_in_dim(xs, 1, axis + 1, keepdims=False), axis)
  return jnp.reshape(jnp.concatenate([lo, hi], axis=axis), x.shape)


@dataclasses.dataclass(frozen=True)
class RingStep:
  """What the local q shard of one rank computes against one visiting K,V shard.

  Local rows ``[q_start, q_stop)`` of q (local shard: 2*chunk_len rows) attend
  to rows ``[kv_start, kv_stop)`` of the visiting K,V shard as ``group``
  (indices relative to those slices) with ``causal``. Other local rows see
  nothing of that shard.
  """

  q_start: int
  q_stop: int
  kv_start: int
  kv_stop: int
  group: QueryGroup
  causal: bool


def zigzag_ring_step(rank: int, source: int, world_size: int, chunk_len: int,
                     causal: bool = True) -> RingStep:
  """Ring attention step of ``rank``'s q against the K,V shard of ``source``.

  Shards are ``[chunk r; chunk 2W-1-r]`` (2*chunk_len rows). Causal:
    source == rank: causal within the shard (the second chunk sees the first);
    source <  rank: all local q sees the visiting first chunk only;
    source >  rank: only the local second chunk sees, both visiting chunks.
  Non-causal: all local q sees the whole visiting shard. The result depends
  only on the ordering of ``source`` vs ``rank``.
  """
  _check_rank(rank, world_size)
  _check_rank(source, world_size)
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len must be a positive int, got {chunk_len=}.")
  c = chunk_len
  if not causal:
    return RingStep(0, 2 * c, 0, 2 * c, QueryGroup(0, 2 * c, 0, 2 * c), False)
  if source == rank:
    return RingStep(0, 2 * c, 0, 2 * c, QueryGroup(0, 2 * c, 0, 2 * c), True)
  if source < rank:
    return RingStep(0, 2 * c, 0, c, QueryGroup(0, 2 * c, 0, c), False)
  return RingStep(c, 2 * c, 0, 2 * c, QueryGroup(0, c, 0, 2 * c), False)
