"""The zigzag (Llama-3 style) layout: pure index geometry on static ints.

A sequence of length S is cut into 2W chunks of c = S / (2W) tokens. Device
r of W holds chunks r and 2W-1-r, so every device gets one early (cheap under
causal masking) and one late (expensive) chunk::

    W = 2, chunks 0 1 2 3:   device 0 holds [0, 3], device 1 holds [1, 2]

Python and numpy only (no JAX): ``cp.permute`` moves arrays into this order,
``cp.ring_schedule`` plans the ring over it.
"""

from __future__ import annotations

import numpy as np

from jax_grouped_attn.groups import QueryGroup


def check_rank(rank: int, world_size: int) -> None:
  """Raises unless ``world_size`` is a positive int and ``rank`` an int in [0, world_size)."""
  if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
    raise ValueError(f"world_size must be a positive int, got {world_size=}.")
  if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
    raise ValueError(f"rank must be an int in [0, {world_size}), got {rank=}.")


def check_chunk_len(chunk_len: int) -> None:
  """Raises unless ``chunk_len`` is a positive int."""
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len must be a positive int, got {chunk_len=}.")


def zigzag_chunks(rank: int, world_size: int) -> tuple[int, int]:
  """The two chunk indices (of 2*world_size) held by ``rank``."""
  check_rank(rank, world_size)
  return rank, 2 * world_size - 1 - rank


def zigzag_groups(rank: int, world_size: int, chunk_len: int) -> tuple[QueryGroup, QueryGroup]:
  """The two query groups of ``rank`` attending to the full, contiguous K,V.

  Local q is ``[chunk rank; chunk 2W-1-rank]`` (2*chunk_len rows). Group 0 sees
  keys up to the end of chunk ``rank``; group 1 up to the end of chunk
  ``2W-1-rank``; both causal with their chunk's start as position offset.
  """
  check_chunk_len(chunk_len)
  lo, hi = zigzag_chunks(rank, world_size)
  c = chunk_len
  return (QueryGroup(0, c, lo * c, (lo + 1) * c),
          QueryGroup(c, c, hi * c, (hi + 1) * c))


def zigzag_order(seq_len: int, world_size: int) -> np.ndarray:
  """Permutation ``perm`` with ``x_zigzag = x[perm]``: device r's shard is
  ``x_zigzag[r*2c:(r+1)*2c]``, i.e. chunks r and 2W-1-r of x."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len=}.")
  check_rank(0, world_size)
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


def positional(causal: bool, window) -> bool:
  """Whether the mask compares token positions (causal or a window); if not,
  any token order will do and the strategies skip reordering."""
  return causal or window is not None
