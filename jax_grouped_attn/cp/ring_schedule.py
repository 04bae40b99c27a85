"""The ring's schedule: pure Python geometry, no JAX.

Ring attention (``cp.ring``) runs W steps; at step s the local q shard of
rank r meets the visiting K,V shard of rank (r - s) mod W (both in the zigzag
layout of ``cp.layout``: chunks r and 2W-1-r of c rows each). This module
decides, statically, what each step computes:

  * :func:`zigzag_ring_calls`: the kernel calls (:class:`RingStep`: which
    local rows, which visiting rows, with which groups and mask) of one
    (rank, source) pair; () when no local row sees any visiting key.
    Without a window causality only orders the chunks (three kinds of step:
    :func:`zigzag_ring_step`); a window depends on chunk distances.
  * :func:`ring_schedule`: the whole ring as :class:`RingSegment`s: which
    steps run (those some rank sees anything of: :func:`ring_steps`), how far
    K,V move between them, and per step which of its distinct call tuples
    ("kinds") each rank runs.

Every (local row, visiting key) pair the global mask makes visible is
covered by exactly one call of one step (tests/test_ring_schedule.py).
"""

from __future__ import annotations

import dataclasses
import functools

from jax_grouped_attn.cp.layout import check_chunk_len, check_rank, zigzag_chunks
from jax_grouped_attn.groups import QueryGroup, kv_range


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
  check_rank(rank, world_size)
  check_rank(source, world_size)
  check_chunk_len(chunk_len)
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
  check_rank(rank, world_size)
  check_rank(source, world_size)
  check_chunk_len(chunk_len)
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


# ---------------------------------------------------------- the whole ring --

@dataclasses.dataclass(frozen=True)
class RingSegment:
  """Consecutive ring steps run alike (static). Step s is the visit of the
  K,V shard of rank - s; rank r runs ``kinds[table[i][r]]`` (a tuple of
  RingStep kernel calls, () for nothing) at ``steps[i]``.

  loop: run as a ``fori_loop`` (then every step moves K,V by one rank).
  arrival: ranks K,V moved to reach ``steps[0]`` (0 at step 0).
  next_shift: ranks they move after ``steps[-1]`` (0: the ring is done).
  """

  steps: tuple[int, ...]
  loop: bool
  arrival: int
  next_shift: int
  kinds: tuple[tuple[RingStep, ...], ...]
  table: tuple[tuple[int, ...], ...]


def ring_steps(world: int, chunk_len: int, causal: bool = True, window=None) -> tuple[int, ...]:
  """The ring steps that run (static): those where some rank's local q sees
  some key of the visiting shard. Without a window all ``world`` steps run.
  With a causal window of left size L, n = ceil(L / chunk_len): steps 0..n
  and world-n..world-1, i.e. min(world, 2n + 1) (non-causal (L, R): with
  n = ceil(max(L, R) / chunk_len) at most the same). E.g. world 4, chunk
  1024, window 512: steps (0, 1, 3); world 8: (0, 1, 7)."""
  return tuple(s for seg in ring_schedule(world, chunk_len, causal, window)
               for s in seg.steps)


@functools.lru_cache(maxsize=64)
def ring_schedule(world: int, chunk_len: int, causal: bool, window) -> tuple[RingSegment, ...]:
  """The static plan of the ring: its segments (see RingSegment). Steps where
  no rank sees any visiting key are skipped: K,V jump over them with one
  ppermute (and the backward's dK, dV with them)."""
  plans = [[zigzag_ring_calls(r, (r - s) % world, world, chunk_len, causal, window)
            for r in range(world)] for s in range(world)]
  active = [s for s in range(world) if any(plans[s])]
  # Every row sees its own key (the window sides are >= 0), so step 0 has work.
  assert active and active[0] == 0, active
  arrival = [0] + [b - a for a, b in zip(active, active[1:])]
  next_shift = arrival[1:] + [0]
  segments, i = [], 0
  while i < len(active):
    j = i
    # A loop iteration receives K,V (and dK, dV) from one rank back and sends
    # them one rank on; the last step of a run stays outside (its send differs).
    while j < len(active) and i > 0 and arrival[j] == 1 and next_shift[j] == 1:
      j += 1
    loop = j - i >= 2
    j = j if loop else i + 1
    steps = tuple(active[i:j])
    kinds, table = {}, []
    for s in steps:
      table.append(tuple(kinds.setdefault(plans[s][r], len(kinds)) for r in range(world)))
    segments.append(RingSegment(steps, loop, arrival[i], next_shift[j - 1],
                                tuple(kinds), tuple(table)))
    i = j
  return tuple(segments)
