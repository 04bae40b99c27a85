"""Mesh axes inside and around shard_map: world size and rank, shard_map across
JAX versions."""

from __future__ import annotations

import inspect

import jax


def axis_size_and_rank(axis_name):
  """(world size: int, rank: traced int32) of ``axis_name`` inside shard_map."""
  try:
    world = jax.lax.axis_size(axis_name) if hasattr(jax.lax, "axis_size") else (
        jax.lax.psum(1, axis_name))
    rank = jax.lax.axis_index(axis_name)
  except NameError as e:
    raise ValueError(
        f"context_parallel axis {axis_name!r} is not bound here: call "
        "attention(..., context_parallel=ContextParallel(axis_name)) inside "
        "jax.shard_map over a mesh with that axis (or use "
        "context_parallel_attention with global arrays).") from e
  return int(world), rank


def shard_map(f, mesh, in_specs, out_specs, check_vma: bool = True):
  """``jax.shard_map`` across JAX versions (``check_vma`` was once ``check_rep``;
  very old versions only have ``jax.experimental.shard_map``)."""
  impl = getattr(jax, "shard_map", None)
  if impl is None:
    from jax.experimental.shard_map import shard_map as impl
  params = inspect.signature(impl).parameters
  kw = {}
  if "check_vma" in params:
    kw["check_vma"] = check_vma
  elif "check_rep" in params:
    kw["check_rep"] = False
  return impl(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)
