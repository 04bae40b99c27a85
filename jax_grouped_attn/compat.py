"""The JAX version shims, in one place.

Tested on jax 0.10.2 (CPU, CI) and 0.11.2 (the GPU image); pyproject asks
for jax>=0.10, which has jax.typeof, jax.shard_map(check_vma=),
jax.lax.pcast / axis_size and jax.sharding.AxisType, so those need no shim.
What differs between 0.10 and 0.11 is below; each says when it can go.
(The Triton interpreter's version checks live with it, triton/runtime.py.)
"""

from __future__ import annotations

import functools
import inspect

import jax


@functools.lru_cache(maxsize=None)
def shape_struct_vma_keyword() -> str | None:
  """The jax.ShapeDtypeStruct keyword that carries shard_map's varying axes:
  ``manual_axis_type`` (jax 0.10) or ``vma``. Can go when the floor has one."""
  params = inspect.signature(jax.ShapeDtypeStruct.__init__).parameters
  for keyword in ("manual_axis_type", "vma"):
    if keyword in params:
      return keyword
  return None


@functools.lru_cache(maxsize=None)
def _mosaic_load_needs_idx() -> bool:
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415  (GPU-only import)
  return inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def mosaic_load(ref, layout):
  """``plgpu.load`` of all of ``ref`` with ``layout``: jax 0.10 requires an
  ``idx`` argument, 0.11 deprecates it. Can go when the floor is jax>=0.11."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415
  if _mosaic_load_needs_idx():
    return plgpu.load(ref, (), layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)
