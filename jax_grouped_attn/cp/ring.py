"""Strategy "ring": the ring's execution (ppermutes, merge, custom_vjp).

Inside shard_map over ``axis_name`` (W devices), K, V circulate with
``ppermute``; at step s rank r attends its local q to the shard of rank
r - s with the kernel calls ``cp.ring_schedule`` planned (static: which
rows, which keys, which steps skip), and each step's partial (out, lse) is
merged in fp32 by log-sum-exp (:func:`merge_partials`). A custom_vjp over the
whole ring circulates K, V and the dK, dV accumulators again. Memory O(2c).
No ppermute inside a step depends on that step's kernel (the backward sends
the previous step's dK, dV), so a latency-hiding scheduler can overlap them.

The rank is traced but the calls are static: a step whose ranks run
different calls is a ``lax.switch`` over its distinct call tuples
(``RingSegment.kinds``; 3 without a window: diagonal, lower, higher source).
With a sliding window the steps no rank can see are skipped, K, V (and dK,
dV) jumping over them in one ppermute: with a causal window of left size L,
min(W, 2 * ceil(L / c) + 1) of the W steps run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.cp.axes import axis_size_and_rank
from jax_grouped_attn.cp.ring_schedule import RingSegment, RingStep, ring_schedule
from jax_grouped_attn.cp.run import Run
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.vma import pvary as _pvary, union as vma_union


@dataclasses.dataclass(frozen=True)
class _Ring:
  """The static facts of one ring (the custom_vjp's nondiff argument)."""

  axis_name: object
  world: int
  causal: bool
  scale: float
  window: tuple | None
  softcap: float | None
  head_dim_v: int | None
  run: Run


def ring_attention(problem: Problem, axis_name, run: Run, q, k, v, qs, ks):
  """Attention of the local zigzag shards q [B, 2c, Hq, D], k, v [B, 2c, Hk, D]
  (segment ids [B, 2c] or None) over ``axis_name``: (out [B, 2c, Hq, D] in q's
  dtype, lse [B, Hq, 2c] f32)."""
  world = axis_size_and_rank(axis_name)[0]
  ring = _Ring(axis_name, world, problem.causal, problem.scale, problem.window,
               problem.softcap, problem.head_dim_v, run)
  return _ring_attention(ring, q, k, v, qs, ks)


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


# --------------------------------------------------------- one ring step --

def _call_problem(ring: _Ring, call: RingStep, q, k, has_segments: bool) -> Problem:
  b, _, hq, d = q.shape
  return Problem(call.groups, b, call.q_stop - call.q_start, call.kv_stop - call.kv_start,
                 hq, k.shape[2], d, call.causal, ring.scale, has_segments, call.window,
                 ring.softcap, ring.head_dim_v)


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


def _calls_fwd(ring, calls, q, qs, kv):
  """The partial (out f32 [B, 2c, Hq, D], lse [B, Hq, 2c]) of ``calls``
  against the visiting ``kv`` (rows they skip: 0, -inf). It is merged into
  the accumulator outside, so the kernels need not wait for the last merge."""
  k, v, ks = kv
  t = q.shape[1]
  acc, done = None, []
  for call in calls:
    problem = _call_problem(ring, call, q, k, qs is not None)
    qr = lambda x: _rows(x, call.q_start, call.q_stop)
    kr = lambda x: _rows(x, call.kv_start, call.kv_stop)
    out, lse = ring.run.forward(problem, qr(q), kr(k), kr(v), qr(qs), kr(ks))
    fresh = all(call.q_start >= c.q_stop or call.q_stop <= c.q_start for c in done)
    acc = _merge_rows(acc, out.astype(jnp.float32), lse.astype(jnp.float32),
                      call.q_start, call.q_stop, t, fresh)
    done.append(call)
  if acc is None:   # no call: this rank sees nothing of this shard
    b, _, hq, _ = q.shape
    like = (q, qs, *kv)
    acc = (_filled((*q.shape[:3], v.shape[3]), 0.0, like),
           _filled((b, hq, t), -jnp.inf, like))
  return acc


def _filled(shape, value, like):
  """An f32 constant varying like a kernel output computed from ``like``
  (switch branches must agree on varying axes)."""
  return _pvary(jnp.full(shape, value, jnp.float32), vma_union(*like))


def _calls_bwd(ring, calls, local, kv, dq):
  """(dq + this step's dq, (dk, dv) of the visiting shard) of ``calls``, given
  the final merged out/lse; f32, dq None: zeros. The dk, dv are added to the
  accumulators outside, so their ppermute need not precede the kernels."""
  q, qs, out, lse, dout, dlse = local
  k, v, ks = kv
  t = q.shape[1]
  dk = dv = None
  for call in calls:
    problem = _call_problem(ring, call, q, k, qs is not None)
    qr = lambda x, axis=1: _rows(x, call.q_start, call.q_stop, axis)
    kr = lambda x: _rows(x, call.kv_start, call.kv_stop)
    gq, gk, gv = ring.run.gradients(problem, qr(q), kr(k), kr(v), qr(qs), kr(ks), qr(out),
                                    qr(lse, 2), qr(dout), qr(dlse, 2))
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


def _dispatch(seg: RingSegment, row, rank, fns, *args):
  """Runs this rank's kind of step ``seg.steps[row]`` (row static or traced)."""
  if len(fns) == 1:
    return fns[0](*args)
  table = np.asarray(seg.table, np.int32)
  if isinstance(row, int) and len(set(table[row])) == 1:
    return fns[int(table[row][0])](*args)
  return jax.lax.switch(jnp.asarray(table)[row, rank], fns, *args)


# ------------------------------------------------------ the ring, both ways --

def _ring_forward(ring: _Ring, q, k, v, qs, ks):
  axis, world = ring.axis_name, ring.world
  segments = ring_schedule(world, q.shape[1] // 2, ring.causal, ring.window)
  rank = axis_size_and_rank(axis)[1] if world > 1 else 0
  kv, acc = (k, v, ks), None
  for seg in segments:
    fns = [functools.partial(_calls_fwd, ring, calls, q, qs) for calls in seg.kinds]
    if seg.loop:   # the visitor of step s is the shard of rank - s
      def step(s, carry, seg=seg, fns=fns):
        kv, acc = carry
        nxt = _ppermute(kv, axis, world)   # independent of this step's kernel
        return nxt, merge_partials(*acc, *_dispatch(seg, s - seg.steps[0], rank, fns, kv))

      kv, acc = jax.lax.fori_loop(seg.steps[0], seg.steps[-1] + 1, step, (kv, acc))
    else:
      nxt = _ppermute(kv, axis, world, seg.next_shift) if seg.next_shift else None
      part = _dispatch(seg, 0, rank, fns, kv)
      acc = part if acc is None else merge_partials(*acc, *part)
      kv = nxt
    if seg.steps[0] == 0 and world > 1:
      acc = tuple(_pvary(x, axis) for x in acc)
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, qs, ks):
  """Ring attention of the local zigzag shards: (out [B, 2c, Hq, D] in q's
  dtype, lse [B, Hq, 2c] f32)."""
  out, lse = _ring_forward(ring, q, k, v, qs, ks)
  return out.astype(q.dtype), lse


def _ring_fwd_rule(ring, q, k, v, qs, ks):
  out, lse = _ring_attention(ring, q, k, v, qs, ks)
  return (out, lse), (q, k, v, qs, ks, out, lse)   # all O(local shard)


def _ring_bwd_rule(ring, res, cts):
  q, k, v, qs, ks, out, lse = res
  dout, dlse = cts
  axis, world = ring.axis_name, ring.world
  segments = ring_schedule(world, q.shape[1] // 2, ring.causal, ring.window)
  rank = axis_size_and_rank(axis)[1] if world > 1 else 0
  local = (q, qs, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32))
  kv, dq, pending = (k, v, ks), None, None
  # Software-pipelined: step s receives the dK, dV accumulators of the kv it
  # visits (they were at the rank that held that kv at the previous step) and
  # sends on the K, V of the next step. Neither send depends on this step's
  # kernel, so both can run while it computes.
  for seg in segments:
    fns = [functools.partial(_calls_bwd, ring, calls, local) for calls in seg.kinds]
    if seg.loop:
      def step(s, carry, seg=seg, fns=fns):
        kv, pending, dq = carry
        nxt = _ppermute(kv, axis, world)
        pending = _ppermute(pending, axis, world)
        dq, grads = _dispatch(seg, s - seg.steps[0], rank, fns, kv, dq)
        return nxt, _add(pending, grads), dq

      kv, pending, dq = jax.lax.fori_loop(seg.steps[0], seg.steps[-1] + 1, step,
                                          (kv, pending, dq))
    else:
      nxt = _ppermute(kv, axis, world, seg.next_shift) if seg.next_shift else None
      if seg.arrival:
        pending = _ppermute(pending, axis, world, seg.arrival)
      dq, grads = _dispatch(seg, 0, rank, fns, kv, dq)
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
