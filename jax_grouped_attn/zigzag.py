"""Zigzag (Llama-3 style) context-parallel index math, in one place.

A sequence of length S is cut into 2W chunks of c = S / (2W) tokens. Device
r of W holds chunks r and 2W-1-r, so every device gets one early (cheap under
causal masking) and one late (expensive) chunk::

    W = 2, chunks 0 1 2 3:   device 0 holds [0, 3], device 1 holds [1, 2]

Everything here is pure Python/numpy on static ints, except that
:func:`zigzag_permute` / :func:`zigzag_unpermute` apply the static permutation
to an array, keeping its sharding where it is known (see ``_permute``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.groups import QueryGroup, kv_range


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
  """Natural order -> zigzag order along ``axis``: ``x`` taken at
  :func:`zigzag_order`. Shard the result evenly over ``world_size`` devices:
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


def _axis_type(name: str):
  return getattr(getattr(jax.sharding, "AxisType", None), name, None)


def _has_axis_type(mesh, name: str) -> bool:
  axis_type = _axis_type(name)
  return axis_type is not None and axis_type in tuple(getattr(mesh, "axis_types", ()) or ())


def _known_sharding(x):
  """``x``'s NamedSharding where it is known, else None: a concrete array's
  own; a traced value's type where its mesh has Explicit axes."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
  if not hasattr(jax, "typeof"):
    return None
  sharding = getattr(jax.typeof(x), "sharding", None)
  return sharding if _has_axis_type(getattr(sharding, "mesh", None), "Explicit") else None


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
  elif not _has_axis_type(sharding.mesh, "Explicit"):
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
  return (hasattr(jax, "shard_map") and not _has_axis_type(mesh, "Manual") and
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


@dataclasses.dataclass(frozen=True)
class RingStep:
  """One kernel call of a ring step: the local q shard of one rank against one
  visiting K,V shard.

  Local rows ``[q_start, q_stop)`` of q (local shard: 2*chunk_len rows) attend
  to rows ``[kv_start, kv_stop)`` of the visiting K,V shard as ``groups`` (one
  QueryGroup or a tuple of them; indices and positions relative to those
  slices) with ``causal`` and ``window`` (``Problem.window``). Other local
  rows see nothing of that slice.
  """

  q_start: int
  q_stop: int
  kv_start: int
  kv_stop: int
  groups: tuple[QueryGroup, ...]
  causal: bool
  window: tuple | None = None

  def __post_init__(self):
    if isinstance(self.groups, QueryGroup):
      object.__setattr__(self, "groups", (self.groups,))


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


# ------------------------------------------------ ring steps with a window --

def zigzag_ring_calls(rank: int, source: int, world_size: int, chunk_len: int,
                      causal: bool = True, window=None) -> tuple[RingStep, ...]:
  """The kernel calls of ``rank``'s q against the K,V shard of ``source``
  under ``window`` (``Problem.window``: None or (left, right)); () when no
  local row sees any visiting key. Calls never share a (row, key) pair.

  Without a window this is ``(zigzag_ring_step(...),)``: causality only
  orders the chunks. A window compares distances, so the steps depend on the
  actual chunk indices: every (local chunk, visiting chunk) pair is
  classified (none / full / partial visible), and the pairs are covered by one
  call over the whole visiting shard when one set of relative positions
  reproduces every pair's mask, else by one call per visiting chunk.
  """
  if window is None:
    return (zigzag_ring_step(rank, source, world_size, chunk_len, causal),)
  _check_rank(rank, world_size)
  _check_rank(source, world_size)
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len must be a positive int, got {chunk_len=}.")
  return _ring_calls(zigzag_chunks(rank, world_size), zigzag_chunks(source, world_size),
                     chunk_len, causal, tuple(window))


def _block_class(d: int, c: int, causal: bool, window) -> str:
  """How rows at positions d..d+c-1 see keys 0..c-1: "none", "full" or "part"."""
  start, end = kv_range(d, d + c - 1, c, causal, window)
  if end <= start:
    return "none"
  # The first row has the smallest end (causal, right), the last the largest start (left).
  if kv_range(d, d, c, causal, window)[1] == c and (
      kv_range(d + c - 1, d + c - 1, c, causal, window)[0] == 0):
    return "full"
  return "part"


def _full_position(n: int, c: int, causal: bool, window):
  """The smallest position p (or, with none, the largest) from which c rows
  p..p+c-1 see all of keys 0..n-1; None if no p does. Canonical positions make
  calls of different ranks equal (fewer switch branches)."""
  left, right = window
  lows = ([n - 1] if causal else []) + ([n - 1 - right] if right is not None else [])
  high = None if left is None else left - c + 1
  p = max(lows) if lows else (high if high is not None else 0)
  return None if high is not None and p > high else p


def _ring_calls(a_chunks, b_chunks, c: int, causal: bool, window) -> tuple[RingStep, ...]:
  dist = [[(a - b) * c for b in b_chunks] for a in a_chunks]
  kind = [[_block_class(d, c, causal, window) for d in row] for row in dist]
  seen = [a for a in (0, 1) if kind[a] != ["none", "none"]]
  used = [b for b in (0, 1) if any(kind[a][b] != "none" for a in (0, 1))]
  if not used:
    return ()

  def exact(a, p, kv_len):
    # Visiting chunk 0 sits at relative keys [0, c), chunk 1 at [c, 2c).
    got = (_block_class(p, c, causal, window),
           _block_class(p - c, c, causal, window) if kv_len == 2 * c else "none")
    return all(g == kind[a][b] and (g != "part" or p - b * c == dist[a][b])
               for b, g in enumerate(got))

  if len(used) == 2:   # try one call over the whole visiting shard
    entries = []
    for a in seen:
      cands = [(p, n) for n in (2 * c, c)
               for p in (_full_position(n, c, causal, window), dist[a][1] + c, dist[a][0])
               if p is not None]
      fit = next(((p, n) for p, n in cands if exact(a, p, n)), None)
      if fit is None:
        break
      entries.append((a, *fit))
    else:
      # Without a mask a group sees exactly its prefix [0, kv_len).
      prefix = lambda n: ["full", "full" if n == 2 * c else "none"]
      masked = any(kind[a] != prefix(n) for a, _, n in entries)
      return (_make_call(entries, 0, 2, c, masked, causal, window),)
  calls = []
  for b in used:   # one call per visiting chunk
    entries = []
    for a in (0, 1):
      if kind[a][b] == "full":
        entries.append((a, _full_position(c, c, causal, window), c))
      elif kind[a][b] == "part":
        entries.append((a, dist[a][b], c))
    masked = any(kind[a][b] == "part" for a in (0, 1))
    calls.append(_make_call(entries, b, b + 1, c, masked, causal, window))
  return tuple(calls)


def _make_call(entries, kv_lo: int, kv_hi: int, c: int, masked: bool, causal: bool,
               window) -> RingStep:
  """A RingStep from (local chunk, position, kv_len) entries over visiting
  chunks [kv_lo, kv_hi); an unmasked call drops the positions and merges groups."""
  q_start, q_stop = entries[0][0] * c, (entries[-1][0] + 1) * c
  groups = []
  for a, p, kv_len in entries:
    p = p if masked else 0
    prev = groups[-1] if groups else None
    if prev is not None and prev.kv_len == kv_len and (
        not masked or prev.q_pos + prev.q_len == p):
      groups[-1] = QueryGroup(prev.q_start, prev.q_len + c, prev.q_pos, kv_len)
    else:
      groups.append(QueryGroup(a * c - q_start, c, p, kv_len))
  return RingStep(q_start, q_stop, kv_lo * c, kv_hi * c, tuple(groups),
                  causal if masked else False,
                  window if masked and window != (None, None) else None)
