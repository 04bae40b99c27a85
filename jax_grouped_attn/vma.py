"""shard_map's varying-axes types (``check_vma=True``).

Inside ``jax.shard_map`` every value carries the set of mesh axes it varies
over. Kernel launches (``pallas_call``, ``triton_call``, host callbacks) do not
infer it, so the launchers declare it on their outputs and the autodiff
wiring marks what a launch returns. Outside shard_map every set is empty and
all of this is a no-op.
"""

from __future__ import annotations

import jax

from jax_grouped_attn import compat

_aval = jax.typeof


def varying_axes(x):
  """The mesh axes ``x`` varies over inside shard_map (its vma type), or None
  where this JAX does not track them (``aval.vma``; ``aval.mat.varying`` in
  some versions)."""
  aval = _aval(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", None)
  return None if vma is None else frozenset(vma)


def union(*xs) -> tuple:
  """Sorted union of the varying axes of the non-None ``xs``."""
  axes = set()
  for x in xs:
    if x is not None:
      axes |= varying_axes(x) or frozenset()
  return tuple(sorted(axes))


def pvary(x, axis_name):
  """Marks ``x`` as varying over ``axis_name`` (a name or tuple of names); a
  no-op where it already is or where this JAX has no such types."""
  if x is None:
    return None
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  vma = varying_axes(x)
  if vma is None:
    return x
  missing = tuple(n for n in names if n not in vma)
  if not missing:
    return x
  return jax.lax.pcast(x, missing, to="varying")


def shape_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """``jax.ShapeDtypeStruct(shape, dtype)`` varying like ``like`` (an array or
  tracer): what pallas_call needs for its outputs under check_vma."""
  keyword = compat.shape_struct_vma_keyword()
  aval = _aval(like)
  if keyword == "manual_axis_type" and getattr(aval, "mat", None) is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
  if keyword == "vma" and getattr(aval, "vma", None) is not None:
    return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def checking() -> bool:
  """Whether the enclosing shard_map checks vma types (True where unknown)."""
  try:
    from jax._src import config as jax_config  # noqa: PLC0415
    return bool(jax_config._check_vma.value)
  except (ImportError, AttributeError):
    return True
