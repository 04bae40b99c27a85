"""Moving arrays between natural and zigzag order (``cp.layout``), keeping
their sharding.

:func:`zigzag_permute` / :func:`zigzag_unpermute` apply the static
permutation to an array, on one device or sharded (see ``_permute``);
:func:`shuffle_shard` is the same move inside shard_map, as two ppermutes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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
  """Natural order -> zigzag order along ``axis``: ``x`` taken at
  ``layout.zigzag_order``. Shard the result evenly over ``world_size`` devices:
  device r gets chunks r and 2W-1-r. Use it for q, k, v and segment ids.

  The result keeps ``x``'s sharding where it is known: on a mesh with
  Explicit axes (eager or under jit) and for a concrete (eager) array on any
  mesh. If ``axis`` is split into exactly ``world_size`` shards, the chunks
  move with two ``ppermute``s (O(S/W) memory per device); a sharding with
  another split gathers the axis first. Under jit on Auto axes, XLA picks the
  result's sharding.
  """
  _check_seq_axis(x, world_size, axis)
  return _permute(x, world_size, axis % x.ndim, inverse=False)


def zigzag_unpermute(x, world_size: int, axis: int = 1):
  """Inverse of :func:`zigzag_permute`: zigzag order -> natural order along
  ``axis``, keeping ``x``'s sharding as :func:`zigzag_permute` does."""
  _check_seq_axis(x, world_size, axis)
  return _permute(x, world_size, axis % x.ndim, inverse=True)


# ------------------------------------------------ permuting sharded arrays --

def _reorder(x, world_size: int, axis: int, inverse: bool):
  """The zigzag permutation (or its inverse) along ``axis`` by reshapes, a flip
  and a stack -- not a gather, so its autodiff transpose is a copy, not a
  scatter-add."""
  w, length = world_size, x.shape[axis]
  c = length // (2 * w)
  if not inverse:   # [2, W, c] (natural chunk a*W + j) -> [W, 2, c]
    xs = jnp.reshape(x, x.shape[:axis] + (2, w, c) + x.shape[axis + 1:])
    lo = jax.lax.index_in_dim(xs, 0, axis, keepdims=False)                   # chunks 0..W-1
    hi = jnp.flip(jax.lax.index_in_dim(xs, 1, axis, keepdims=False), axis)   # 2W-1..W
    return jnp.reshape(jnp.stack([lo, hi], axis=axis + 1), x.shape)
  xs = jnp.reshape(x, x.shape[:axis] + (w, 2, c) + x.shape[axis + 1:])
  lo = jax.lax.index_in_dim(xs, 0, axis + 1, keepdims=False)
  hi = jnp.flip(jax.lax.index_in_dim(xs, 1, axis + 1, keepdims=False), axis)
  return jnp.reshape(jnp.concatenate([lo, hi], axis=axis), x.shape)


def has_axis_type(mesh, name: str) -> bool:
  """Whether ``mesh`` has an axis of type ``name`` ("Explicit", "Manual", ...)."""
  axis_type = getattr(jax.sharding.AxisType, name)
  return axis_type in tuple(getattr(mesh, "axis_types", ()) or ())


def _known_sharding(x):
  """``x``'s NamedSharding where it is known, else None: a concrete array's
  own; a traced value's type where its mesh has Explicit axes."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
  sharding = getattr(jax.typeof(x), "sharding", None)
  return sharding if has_axis_type(getattr(sharding, "mesh", None), "Explicit") else None


def _axis_names(sharding, axis: int):
  """The mesh axes that split array axis ``axis``: () if none, None if unknown."""
  spec = tuple(sharding.spec)
  entry = spec[axis] if axis < len(spec) else None
  if entry is None:
    return ()
  names = entry if isinstance(entry, tuple) else (entry,)
  return names if all(isinstance(n, str) for n in names) else None


def _permute(x, world_size: int, axis: int, inverse: bool):
  """``x`` in zigzag order along ``axis`` (natural order when ``inverse``),
  with the sharding ``zigzag_permute`` documents (_reorder: no gather)."""
  take = lambda y: _reorder(y, world_size, axis, inverse)
  sharding = _known_sharding(x)
  names = None if sharding is None else _axis_names(sharding, axis)
  if sharding is None or names == ():
    out = take(x)   # the permuted axis is whole on every device
  elif names and _can_shuffle(sharding, names, world_size):
    return _shuffle(x, sharding, names, world_size, axis, inverse)
  elif not has_axis_type(sharding.mesh, "Explicit"):
    out = take(x)
  else:   # split some other way on Explicit axes: gather the axis first
    spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
    spec[axis] = None
    whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.sharding.reshard(take(jax.sharding.reshard(x, whole)), sharding)
  if sharding is not None and not isinstance(out, jax.core.Tracer) and out.sharding != sharding:
    out = jax.device_put(out, sharding)
  return out


def _can_shuffle(sharding, names, world_size: int) -> bool:
  mesh = sharding.mesh
  return (not has_axis_type(mesh, "Manual") and
          int(np.prod([mesh.shape[n] for n in names])) == world_size)


def _shuffle(x, sharding, names, world_size: int, axis: int, inverse: bool):
  """The zigzag permutation of ``x``, whose ``axis`` is split into
  ``world_size`` shards over mesh axes ``names``, as a shard_map."""
  return _shuffle_fn(sharding.mesh, sharding.spec, names, world_size, axis, inverse)(x)


@functools.lru_cache(maxsize=256)
def _shuffle_fn(mesh, spec, names, world_size: int, axis: int, inverse: bool):
  """The jitted shard_map of :func:`shuffle_shard` (cached: eager calls
  compile once)."""
  name = names if len(names) > 1 else names[0]
  local = lambda t: shuffle_shard(t, name, world_size, axis, inverse=inverse)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))


def shuffle_shard(x, axis_name, world_size: int, axis: int = 1, *, inverse: bool = False):
  """Inside shard_map over ``axis_name`` (``world_size`` devices): this
  device's shard of a natural-order sequence -> its zigzag shard (the inverse
  if ``inverse``), as two ``ppermute``s of half a shard each.

  Natural order: device d holds chunks 2d, 2d+1 (of 2W). Zigzag order:
  device r holds chunks r, 2W-1-r. Chunk j goes to device j (first half) if
  j < W, else to device 2W-1-j (second half); so each device receives one
  even and one odd chunk, the even one first iff the device is even.
  """
  w = world_size
  if x.shape[axis] % 2:
    raise ValueError(f"{x.shape=}: the local shard length (axis {axis}) must be even.")
  dest = lambda j: j if j < w else 2 * w - 1 - j
  to_zigzag = [[(d, dest(2 * d + h)) for d in range(w)] for h in (0, 1)]
  c = x.shape[axis] // 2
  lo = jax.lax.slice_in_dim(x, 0, c, axis=axis)
  hi = jax.lax.slice_in_dim(x, c, 2 * c, axis=axis)
  even = jax.lax.axis_index(axis_name) % 2 == 0
  if inverse:
    evens, odds = jnp.where(even, lo, hi), jnp.where(even, hi, lo)
    back = [[(b, a) for a, b in perm] for perm in to_zigzag]
    return jnp.concatenate([jax.lax.ppermute(evens, axis_name, back[0]),
                            jax.lax.ppermute(odds, axis_name, back[1])], axis=axis)
  evens = jax.lax.ppermute(lo, axis_name, to_zigzag[0])
  odds = jax.lax.ppermute(hi, axis_name, to_zigzag[1])
  return jnp.concatenate([jnp.where(even, evens, odds), jnp.where(even, odds, evens)],
                         axis=axis)
