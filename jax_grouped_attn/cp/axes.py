"""Mesh axes inside and around shard_map: world size and rank, shard_map."""

from __future__ import annotations

import jax


def axis_size_and_rank(axis_name):
  """(world size: int, rank: traced int32) of ``axis_name`` inside shard_map."""
  try:
    world = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
  except NameError as e:
    raise ValueError(
        f"context_parallel axis {axis_name!r} is not bound here: call "
        "attention(..., context_parallel=ContextParallel(axis_name)) inside "
        "jax.shard_map over a mesh with that axis (or use "
        "context_parallel_attention with global arrays).") from e
  return int(world), rank


def shard_map(f, mesh, in_specs, out_specs, check_vma: bool = True):
  """``jax.shard_map`` with keyword specs."""
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=check_vma)
