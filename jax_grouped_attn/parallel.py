"""Zigzag context parallelism: exact attention over a sequence sharded on mesh axes.

Inside ``jax.shard_map``, with the sequence axis (axis 1) of q, k, v sharded
over ``cp.sequence_axes`` in zigzag order (``zigzag_permute``), every device
holds 2c tokens -- chunks r and 2W-1-r of 2W -- and calls
``attention(q, k, v, causal=..., context_parallel=cp)``.

Strategies (``ContextParallel.strategy``, over ``axis_name``):
  "allgather": all-gather K, V (and kv segment ids), restore natural order,
    run ONE grouped kernel with ``zigzag_groups(rank, W, c)``. Its backward is
    the grouped kernel's custom_vjp; the all-gather's transpose is a
    reduce-scatter of dK, dV back to the zigzag shards. Memory O(W * 2c) for
    the gathered K, V.
  "ring": K, V circulate with ``ppermute`` for W steps (fewer with a sliding
    window); each step's partial (out, lse) is merged in fp32 by log-sum-exp.
    A custom_vjp over the whole ring circulates K, V and the dK, dV
    accumulators again. Memory O(2c). No ppermute inside a step depends on
    that step's kernel (the backward sends the previous step's dK, dV), so a
    latency-hiding scheduler can overlap them.
  "ulysses": all-to-all from sequence to head sharding (each device gets the
    whole sequence for Hq/W query heads and their kv heads), ``zigzag_unpermute``
    to natural order, ONE causal kernel, and back. Needs Hq % W == 0; kv heads
    are split when Hk % W == 0, else repeated first. Gradients are JAX's
    transpose of the all-to-alls around the kernel's custom_vjp.

2-D (``ulysses_axis_name=`` with "allgather" or "ring"): the sequence is
sharded over ``(*axis_name, *ulysses_axis_name)`` flattened outer-major,
W = W_out * W_in. Ulysses over the inner axis gathers the 2 * W_in chunks of
an outer group; in zigzag(W_in) order they are exactly the zigzag(W_out) shard
of that group (chunks o and 2*W_out-1-o of 2*W_out), so after
``zigzag_unpermute(., W_in)`` the outer strategy runs unchanged on
W_in * 2c tokens and Hq / W_in heads. Plain "ulysses" is the case W_out = 1,
where that shard is the whole sequence in natural order.

The rank is a traced value (``lax.axis_index``) but groups are static, so the
rank-dependent choice is a ``lax.switch``: "allgather" compiles W grouped
kernels (one per rank, ``zigzag_groups(r, W, c)``) and runs one; "ring"
compiles 3 step kinds (``zigzag_ring_step``: diagonal, lower, higher source)
and picks one per step. Non-causal attention needs no switch (nor Ulysses'
unpermute: without a mask the token order does not matter).

Sliding windows (``Problem.window``) compare global positions, like causal:
"allgather" and "ulysses" run their kernels on true positions (natural order,
a window forces the rank switch / unpermute also without causal), and the
kernels skip the kv blocks outside the window. The ring's steps then depend
on the distance between the local and visiting chunks (``zigzag_ring_calls``:
one or two calls per step, possibly rank-dependent), and the steps where no
rank sees a visiting key are skipped (``ring_steps``): with a causal window
of left size L, min(W, 2 * ceil(L / c) + 1) of the W steps run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_grouped_attn import autodiff, registry, validate
from jax_grouped_attn.config import as_attention_config
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.vma import pvary as _pvary, union as vma_union
from jax_grouped_attn.zigzag import (
  RingStep,
  shuffle_shard,
  zigzag_groups,
  zigzag_permute,
  zigzag_ring_calls,
  zigzag_unpermute,
)

STRATEGIES = ("allgather", "ring", "ulysses")


def _names(axis) -> tuple:
  return () if axis is None else (axis if isinstance(axis, tuple) else (axis,))


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Shard the sequence over mesh axes in zigzag order.

  axis_name: a mesh axis or a tuple of them (one flattened axis).
  strategy: "allgather" (gather K, V once; one kernel), "ring" (K, V circulate
    with ppermute; memory independent of the world size) or "ulysses"
    (all-to-all to head sharding; needs Hq % W == 0).
  ulysses_axis_name: 2-D context parallelism: Ulysses over these (inner,
    e.g. intra-node) axes, ``strategy`` ("allgather" or "ring") over
    ``axis_name``; the sequence is sharded over ``sequence_axes``.
  """

  axis_name: str | tuple[str, ...]
  strategy: str = "allgather"
  ulysses_axis_name: str | tuple[str, ...] | None = None

  def __post_init__(self):
    validate.check_context_parallel(self.axis_name, self.strategy, self.ulysses_axis_name,
                                    STRATEGIES)

  @property
  def sequence_axes(self) -> tuple[str, ...]:
    """All axes the sequence is sharded over, outer-major: q, k, v take
    ``P(batch_axes, cp.sequence_axes)``."""
    return _names(self.axis_name) + _names(self.ulysses_axis_name)

  @property
  def ulysses_axes(self):
    """The axis the all-to-all runs over (None: no Ulysses)."""
    return self.axis_name if self.strategy == "ulysses" else self.ulysses_axis_name

  @property
  def sequence_strategy(self):
    """The strategy over the sequence-sharded (outer) axis, None for pure Ulysses."""
    return None if self.strategy == "ulysses" else self.strategy


# ----------------------------------------------------------------- helpers --

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


def merge_partials(out1, lse1, out2, lse2):
  """Exact fp32 merge of two partial attentions over disjoint key sets.

  out: [B, T, H, D] float32, lse: [B, H, T] float32 (-inf: the row saw no key
  there). lse = logaddexp(lse1, lse2); out = sum_i exp(lse_i - lse) out_i.
  Rows that saw no key in either stay out = 0, lse = -inf (no NaN).
  """
  m = jnp.maximum(lse1, lse2)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
  total = w1 + w2
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
  c1 = jnp.swapaxes(w1 / safe, 1, 2)[..., None]
  c2 = jnp.swapaxes(w2 / safe, 1, 2)[..., None]
  return out1 * c1 + out2 * c2, lse


@dataclasses.dataclass(frozen=True)
class _Run:
  """The resolved kernel choice every strategy passes down to autodiff."""

  backend: object   # an entry name, or a (forward, backward) pair of them
  config: object
  interpret: bool
  backward: str


# ------------------------------------------------------------ the dispatch --

def local_attention(problem: Problem, cp: ContextParallel, backend, config,
                    interpret: bool, backward: str, q, k, v, q_segment_ids,
                    kv_segment_ids):
  """Context-parallel attention of the local zigzag shards (inside shard_map).

  q: [B, 2c, Hq, D], k, v: [B, 2c, Hk, D], segment ids [B, 2c] int (or None):
  this device's shard, described (and validated) by ``problem`` as one
  self-attention group; ``backend`` (an entry name, or a (forward, backward)
  pair of them), ``config`` (an AttentionConfig), ``interpret`` and
  ``backward`` are resolved. Returns
  (out [B, 2c, Hq, D], lse [B, Hq, 2c] f32).
  """
  run = _Run(backend, config, interpret, backward)
  inner = cp.ulysses_axes
  w_in = axis_size_and_rank(inner)[0] if inner is not None else 1
  validate.check_context_parallel_shards(q, k, w_in, inner)
  if inner is None:
    return _sequence_parallel(problem, cp.strategy, cp.axis_name, run, q, k, v,
                              q_segment_ids, kv_segment_ids)
  return _ulysses_attention(problem, cp, run, w_in, q, k, v, q_segment_ids, kv_segment_ids)


def _sequence_parallel(problem, strategy, axis_name, run, q, k, v, qs, ks):
  """"allgather" or "ring" over ``axis_name`` on local zigzag shards."""
  world, rank = axis_size_and_rank(axis_name)
  if strategy == "allgather":
    return _allgather_attention(problem, run, q, k, v, qs, ks, axis_name, world, rank)
  spec = _RingSpec(axis_name, world, problem.causal, problem.scale, run.backend,
                   run.config, run.interpret, run.backward, problem.window)
  return _ring_attention(spec, q, k, v, qs, ks)


# ----------------------------------------------------------------- ulysses --

def kv_head_repeats(hk: int, world: int) -> int:
  """How often Ulysses repeats each kv head so ``world`` equal, contiguous
  query-head slices each get whole kv heads: 1 when Hk % W == 0, else
  W / gcd(Hk, W). Then Hk * r = lcm(Hk, W), which divides Hq (a multiple of
  both), and query head h still reads repeated head h // (Hq / (Hk * r)),
  a copy of its kv head h // (Hq / Hk)."""
  return world // math.gcd(hk, world)


def ulysses_to_heads(x, axis_name, world: int, ordered: bool):
  """Local zigzag shard [B, 2c, H, D] -> [B, W*2c, H/W, D]: this device's head
  slice over the 2W chunks of its group, in natural order when ``ordered``."""
  x = jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True)
  return zigzag_unpermute(x, world, axis=1) if ordered else x


def ulysses_to_sequence(x, axis_name, world: int, ordered: bool, seq_axis=1, head_axis=2):
  """Inverse of :func:`ulysses_to_heads` (``seq_axis=2, head_axis=1`` for lse)."""
  if ordered:
    x = zigzag_permute(x, world, axis=seq_axis)
  return jax.lax.all_to_all(x, axis_name, seq_axis, head_axis, tiled=True)


def _positional(problem: Problem) -> bool:
  """Whether the mask depends on token positions (else any order will do)."""
  return problem.causal or problem.window is not None


def _ulysses_attention(problem, cp, run, w_in, q, k, v, qs, ks):
  # Natural order inside (the window, like causal, compares positions).
  axis, ordered = cp.ulysses_axes, _positional(problem)
  reps = kv_head_repeats(problem.hk, w_in)
  if reps > 1:   # GQA with Hk % W != 0: whole kv heads per query-head slice
    k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
  heads = lambda x: ulysses_to_heads(x, axis, w_in, ordered)
  q, k, v = heads(q), heads(k), heads(v)

  def gather(ids):
    ids = jax.lax.all_gather(ids, axis, axis=1, tiled=True)
    return zigzag_unpermute(ids, w_in, axis=1) if ordered else ids

  if qs is not None:
    same = qs is ks   # segment_ids=: gather once
    qs = gather(qs)
    ks = qs if same else gather(ks)
  t = q.shape[1]
  inner = dataclasses.replace(problem, groups=(QueryGroup(0, t, 0, t),), tq=t, tk=t,
                              hq=q.shape[2], hk=k.shape[2])
  if cp.sequence_strategy is None:
    out, lse = autodiff.attention(inner, run.backend, run.config, run.interpret,
                                  run.backward, q, k, v, qs, ks)
  else:
    out, lse = _sequence_parallel(inner, cp.sequence_strategy, cp.axis_name, run,
                                  q, k, v, qs, ks)
  out = ulysses_to_sequence(out, axis, w_in, ordered)
  lse = ulysses_to_sequence(lse, axis, w_in, ordered, seq_axis=2, head_axis=1)
  return out, lse


# --------------------------------------------------------------- allgather --

def _allgather_attention(problem, run, q, k, v, qs, ks, axis_name, world, rank):
  t = q.shape[1]
  c, s = t // 2, world * t
  gather = lambda x: None if x is None else jax.lax.all_gather(
      x, axis_name, axis=1, tiled=True)
  k_all, v_all, ks_all = gather(k), gather(v), gather(ks)

  def call(groups, q, k, v, qs, ks):
    grouped = dataclasses.replace(problem, groups=groups, tk=s)
    return autodiff.attention(grouped, run.backend, run.config, run.interpret, run.backward,
                              q, k, v, qs, ks)

  if not _positional(problem):
    # Every row sees every key: the gathered (zigzag) key order is as good as
    # the natural one, so skip the unpermute and the rank switch.
    return call((QueryGroup(0, t, 0, s),), q, k_all, v_all, qs, ks_all)
  # The positions of the local rows differ by rank; the kernel skips the kv
  # blocks outside each group's (causal, window) range itself. All of K, V is
  # still gathered: the two local chunks need keys near both ends.
  unperm = lambda x: None if x is None else zigzag_unpermute(x, world, axis=1)
  k_all, v_all, ks_all = unperm(k_all), unperm(v_all), unperm(ks_all)

  def groups(r):
    g = zigzag_groups(r, world, c)
    # Non-causal (with a window): every group may look past its chunk.
    return g if problem.causal else tuple(dataclasses.replace(x, kv_len=s) for x in g)

  if world == 1:
    return call(groups(0), q, k_all, v_all, qs, ks_all)
  branches = [functools.partial(call, groups(r)) for r in range(world)]
  return jax.lax.switch(rank, branches, q, k_all, v_all, qs, ks_all)


# -------------------------------------------------------------------- ring --

@dataclasses.dataclass(frozen=True)
class _RingSpec:
  axis_name: object
  world: int
  causal: bool
  scale: float
  backend: str
  config: object
  interpret: bool
  backward: str
  window: tuple | None = None


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


def _call_problem(spec: _RingSpec, call: RingStep, q, k, has_segments: bool) -> Problem:
  b, _, hq, d = q.shape
  return Problem(call.groups, b, call.q_stop - call.q_start, call.kv_stop - call.kv_start,
                 hq, k.shape[2], d, call.causal, spec.scale, has_segments, call.window)


def _rows(x, start, stop, axis=1):
  return None if x is None else jax.lax.slice_in_dim(x, start, stop, axis=axis)


def _embed(x, start, stop, length, axis, fill):
  """Pads rows [start, stop) of ``x`` along ``axis`` to ``length`` with ``fill``."""
  if start == 0 and stop == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (start, length - stop)
  return jnp.pad(x, pad, constant_values=fill)


def _merge_rows(acc, out, lse, start, stop, length, fresh=False):
  """Merges the partial (out, lse) of rows [start, stop) into ``acc`` (None:
  none yet); ``fresh``: acc has nothing on those rows yet (a copy will do)."""
  if acc is None:
    return (_embed(out, start, stop, length, 1, 0.0),
            _embed(lse, start, stop, length, 2, -jnp.inf))
  if not fresh:
    if start == 0 and stop == length:
      return merge_partials(*acc, out, lse)
    out, lse = merge_partials(acc[0][:, start:stop], acc[1][:, :, start:stop], out, lse)
  return acc[0].at[:, start:stop].set(out), acc[1].at[:, :, start:stop].set(lse)


def _add_rows(acc, g, start, stop, length):
  """acc (None: zeros) + g on rows [start, stop) along axis 1."""
  if acc is None:
    return _embed(g, start, stop, length, 1, 0.0)
  if start == 0 and stop == length:
    return acc + g
  return acc.at[:, start:stop].add(g)


def _calls_fwd(spec, calls, q, qs, kv):
  """The partial (out f32 [B, 2c, Hq, D], lse [B, Hq, 2c]) of ``calls``
  against the visiting ``kv`` (rows they skip: 0, -inf). It is merged into
  the accumulator outside, so the kernels need not wait for the last merge."""
  k, v, ks = kv
  t = q.shape[1]
  acc, done = None, []
  for call in calls:
    problem = _call_problem(spec, call, q, k, qs is not None)
    qr = lambda x: _rows(x, call.q_start, call.q_stop)
    kr = lambda x: _rows(x, call.kv_start, call.kv_stop)
    out, lse = autodiff.attention_fwd(problem, spec.backend, spec.config, spec.interpret,
                                      qr(q), kr(k), kr(v), qr(qs), kr(ks))
    fresh = all(call.q_start >= c.q_stop or call.q_stop <= c.q_start for c in done)
    acc = _merge_rows(acc, out.astype(jnp.float32), lse.astype(jnp.float32),
                      call.q_start, call.q_stop, t, fresh)
    done.append(call)
  if acc is None:   # no call: this rank sees nothing of this shard
    b, _, hq, _ = q.shape
    like = (q, qs, *kv)
    acc = (_filled(q.shape, 0.0, like), _filled((b, hq, t), -jnp.inf, like))
  return acc


def _filled(shape, value, like):
  """An f32 constant varying like a kernel output computed from ``like``
  (switch branches must agree on varying axes)."""
  return _pvary(jnp.full(shape, value, jnp.float32), vma_union(*like))


def _calls_bwd(spec, calls, local, kv, dq):
  """(dq + this step's dq, (dk, dv) of the visiting shard) of ``calls``, given
  the final merged out/lse; f32, dq None: zeros. The dk, dv are added to the
  accumulators outside, so their ppermute need not precede the kernels."""
  q, qs, out, lse, dout, dlse = local
  k, v, ks = kv
  t = q.shape[1]
  dk = dv = None
  for call in calls:
    problem = _call_problem(spec, call, q, k, qs is not None)
    qr = lambda x, axis=1: _rows(x, call.q_start, call.q_stop, axis)
    kr = lambda x: _rows(x, call.kv_start, call.kv_stop)
    gq, gk, gv = autodiff.attention_bwd(
        problem, spec.backend, spec.config, spec.interpret, spec.backward,
        qr(q), kr(k), kr(v), qr(qs), kr(ks), qr(out), qr(lse, 2), qr(dout), qr(dlse, 2))
    f32 = lambda x: x.astype(jnp.float32)
    dq = _add_rows(dq, f32(gq), call.q_start, call.q_stop, t)
    dk = _add_rows(dk, f32(gk), call.kv_start, call.kv_stop, t)
    dv = _add_rows(dv, f32(gv), call.kv_start, call.kv_stop, t)
  zeros = lambda x, shape: _filled(shape, 0.0, (*local, *kv)) if x is None else x
  return zeros(dq, q.shape), (zeros(dk, k.shape), zeros(dv, v.shape))


def _ppermute(tree, axis_name, world, shift=1):
  """Sends every leaf of ``tree`` from rank i to rank i+shift (mod world)."""
  perm = [(i, (i + shift) % world) for i in range(world)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _run(seg: RingSegment, row, rank, fns, *args):
  """Runs this rank's kind of step ``seg.steps[row]`` (row static or traced)."""
  if len(fns) == 1:
    return fns[0](*args)
  table = np.asarray(seg.table, np.int32)
  if isinstance(row, int) and len(set(table[row])) == 1:
    return fns[int(table[row][0])](*args)
  return jax.lax.switch(jnp.asarray(table)[row, rank], fns, *args)


def _ring_forward(spec: _RingSpec, q, k, v, qs, ks):
  axis, world = spec.axis_name, spec.world
  segments = ring_schedule(world, q.shape[1] // 2, spec.causal, spec.window)
  rank = axis_size_and_rank(axis)[1] if world > 1 else 0
  kv, acc = (k, v, ks), None
  for seg in segments:
    fns = [functools.partial(_calls_fwd, spec, calls, q, qs) for calls in seg.kinds]
    if seg.loop:   # the visitor of step s is the shard of rank - s
      def step(s, carry, seg=seg, fns=fns):
        kv, acc = carry
        nxt = _ppermute(kv, axis, world)   # independent of this step's kernel
        return nxt, merge_partials(*acc, *_run(seg, s - seg.steps[0], rank, fns, kv))

      kv, acc = jax.lax.fori_loop(seg.steps[0], seg.steps[-1] + 1, step, (kv, acc))
    else:
      nxt = _ppermute(kv, axis, world, seg.next_shift) if seg.next_shift else None
      part = _run(seg, 0, rank, fns, kv)
      acc = part if acc is None else merge_partials(*acc, *part)
      kv = nxt
    if seg.steps[0] == 0 and world > 1:
      acc = tuple(_pvary(x, axis) for x in acc)
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(spec: _RingSpec, q, k, v, qs, ks):
  """Ring attention of the local zigzag shards: (out [B, 2c, Hq, D] in q's
  dtype, lse [B, Hq, 2c] f32)."""
  out, lse = _ring_forward(spec, q, k, v, qs, ks)
  return out.astype(q.dtype), lse


def _ring_fwd_rule(spec, q, k, v, qs, ks):
  out, lse = _ring_attention(spec, q, k, v, qs, ks)
  return (out, lse), (q, k, v, qs, ks, out, lse)   # all O(local shard)


def _ring_bwd_rule(spec, res, cts):
  q, k, v, qs, ks, out, lse = res
  dout, dlse = cts
  axis, world = spec.axis_name, spec.world
  segments = ring_schedule(world, q.shape[1] // 2, spec.causal, spec.window)
  rank = axis_size_and_rank(axis)[1] if world > 1 else 0
  local = (q, qs, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32))
  kv, dq, pending = (k, v, ks), None, None
  # Software-pipelined: step s receives the dK, dV accumulators of the kv it
  # visits (they were at the rank that held that kv at the previous step) and
  # sends on the K, V of the next step. Neither send depends on this step's
  # kernel, so both can run while it computes.
  for seg in segments:
    fns = [functools.partial(_calls_bwd, spec, calls, local) for calls in seg.kinds]
    if seg.loop:
      def step(s, carry, seg=seg, fns=fns):
        kv, pending, dq = carry
        nxt = _ppermute(kv, axis, world)
        pending = _ppermute(pending, axis, world)
        dq, grads = _run(seg, s - seg.steps[0], rank, fns, kv, dq)
        return nxt, _add(pending, grads), dq

      kv, pending, dq = jax.lax.fori_loop(seg.steps[0], seg.steps[-1] + 1, step,
                                          (kv, pending, dq))
    else:
      nxt = _ppermute(kv, axis, world, seg.next_shift) if seg.next_shift else None
      if seg.arrival:
        pending = _ppermute(pending, axis, world, seg.arrival)
      dq, grads = _run(seg, 0, rank, fns, kv, dq)
      pending = _add(pending, grads)
      kv = nxt
    if seg.steps[0] == 0 and world > 1:
      dq, pending = _pvary(dq, axis), tuple(_pvary(x, axis) for x in pending)
  home = (world - segments[-1].steps[-1]) % world
  dk, dv = _ppermute(pending, axis, world, home) if home else pending   # to their owner
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


def _add(pending, grads):
  return grads if pending is None else jax.tree.map(jnp.add, pending, grads)


_ring_attention.defvjp(_ring_fwd_rule, _ring_bwd_rule)


# ------------------------------------------------- global-array convenience --

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


def _has_explicit_axes(mesh) -> bool:
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ())


def context_parallel_attention(q, k, v, mesh, axis_name, *, strategy="allgather",
                               ulysses_axis_name=None, causal=False, softmax_scale=None,
                               segment_ids=None, q_segment_ids=None, kv_segment_ids=None,
                               batch_axis_name=None, backend="auto",
                               return_lse=False, config=None, interpret=None,
                               backward="kernel", local_window_size=None):
  """Zigzag context-parallel self-attention of GLOBAL arrays in natural order.

  Shards the sequence (axis 1) over mesh axes ``cp.sequence_axes`` (and the
  batch over ``batch_axis_name`` if given) in natural order; inside
  ``jax.shard_map`` moves each shard to zigzag order (two ``ppermute``s), runs
  ``attention(..., context_parallel=cp)`` with ``cp = ContextParallel(axis_name,
  strategy, ulysses_axis_name)`` and moves the result back.

  Works on meshes with Auto or Explicit axes (``jax.make_mesh``'s default in
  new JAX). On Explicit axes the inputs are resharded to
  ``P(batch_axis_name, cp.sequence_axes)``, and ``out`` keeps that sharding
  (``lse``: ``P(batch_axis_name, None, cp.sequence_axes)``). JAX itself wants eager
  differentiation on Explicit axes inside ``with jax.set_mesh(mesh):``
  (jitted code does not need it).

  Args:
    q: [B, S, Hq, D]; k, v: [B, S, Hk, D]; S divisible by 2 * W, W the product
      of the sizes of ``axis_name`` (and ``ulysses_axis_name``) on ``mesh``.
    strategy, ulysses_axis_name: as in :class:`ContextParallel`.
    segment_ids / q_segment_ids / kv_segment_ids: [B, S] int (as in ``attention``).
    local_window_size: sliding window over sequence positions, as in
      :func:`jax_grouped_attn.attention`.
    Other arguments as in :func:`jax_grouped_attn.attention`.

  Returns:
    out [B, S, Hq, D] (natural order), or (out, lse [B, Hq, S] f32).
  """
  cp = ContextParallel(axis_name, strategy, ulysses_axis_name)
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  validate.check_context_parallel_global(q, k, v, mesh.shape, cp.sequence_axes,
                                         batch_axis_name)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    q_segment_ids = kv_segment_ids = segment_ids
  # Validated once, on the global arrays; the shard_map body trusts them.
  s_len = q.shape[1]
  problem = validate.make_problem(
      q, k, v, (QueryGroup(0, s_len, 0, s_len),), causal=causal, softmax_scale=softmax_scale,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      local_window_size=local_window_size)
  return_lse = validate.check_bool("return_lse", return_lse)
  backward = validate.check_backward_mode(backward)
  cfg = as_attention_config(config)
  entries, interp = registry.resolve(backend, interpret, cfg, problem, q.dtype)
  registry.check_config(entries, cfg)
  names = tuple(e.name for e in entries)
  args = [q, k, v] + ([q_segment_ids, kv_segment_ids] if q_segment_ids is not None else [])
  # Some interpreters fail shard_map's varying-axes check (Backend.interpret_vma).
  key = (mesh, cp, batch_axis_name, len(args), problem, names, cfg, interp, backward,
         all(e.interpret_vma for e in entries) or not interp)
  try:
    hash(key)
  except TypeError:   # an unhashable argument: build it uncached
    fn = _sharded_attention.__wrapped__(*key)
  else:
    fn = _sharded_attention(*key)
  out, lse = fn(*args)
  return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _sharded_attention(mesh, cp, batch_axis_name, n_args, problem, backend, config,
                       interpret, backward, check_vma):
  """The jitted shard_map of context_parallel_attention (cached, so eager
  calls compile once): global natural-order arrays -> (out, lse)."""
  axes = cp.sequence_axes
  world = int(np.prod([mesh.shape[n] for n in axes]))
  axis = axes if len(axes) > 1 else axes[0]
  seq = P(batch_axis_name, axis)
  shuffle = lambda x, dim=1, inverse=False: shuffle_shard(x, axis, world, dim,
                                                          inverse=inverse)

  def body(*shards):   # natural-order shards in and out; zigzag in between
    q, k, v, *segments = (shuffle(x) for x in shards)
    qs, ks = segments or (None, None)
    b, t = q.shape[:2]
    local = dataclasses.replace(problem, groups=(QueryGroup(0, t, 0, t),), batch=b, tq=t, tk=t)
    out, lse = local_attention(local, cp, backend, config, interpret, backward, q, k, v,
                               qs, ks)
    return shuffle(out, inverse=True), shuffle(lse, dim=2, inverse=True)

  fn = shard_map(body, mesh, (seq,) * n_args, (seq, P(batch_axis_name, None, axis)),
                 check_vma=check_vma)
  if not _has_explicit_axes(mesh):
    return jax.jit(fn)
  sharding = jax.sharding.NamedSharding(mesh, seq)
  # shard_map takes arrays typed with its in_specs on Explicit axes.
  return jax.jit(lambda *args: fn(*(jax.sharding.reshard(x, sharding) for x in args)))
