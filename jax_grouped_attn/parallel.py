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
  "ring": K, V circulate with ``ppermute`` for W steps; each step's partial
    (out, lse) is merged in fp32 by log-sum-exp. A custom_vjp over the whole
    ring circulates K, V and the dK, dV accumulators again. Memory O(2c). No
    ppermute inside a step depends on that step's kernel (the backward sends
    the previous step's dK, dV), so a latency-hiding scheduler can overlap them.
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
from jax_grouped_attn.vma import pvary as _pvary
from jax_grouped_attn.zigzag import (shuffle_shard, zigzag_groups, zigzag_permute,
                                     zigzag_ring_step, zigzag_unpermute)

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


def _ppermute(tree, axis_name, world):
  """Sends every leaf of ``tree`` from rank i to rank i+1 (mod world)."""
  perm = [(i, (i + 1) % world) for i in range(world)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


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
  if problem.window is not None:
    raise NotImplementedError(
        f"context_parallel does not take local_window_size yet (got {problem.window}).")
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
                   run.config, run.interpret, run.backward)
  return _ring_attention(spec, q, k, v, qs, ks)


# ----------------------------------------------------------------- ulysses --

def kv_head_repeats(hk: int, world: int) -> int:
  """How often Ulysses repeats each kv head so ``world`` equal, contiguous
  query-head slices each get whole kv heads: 1 when Hk % W == 0, else
  W / gcd(Hk, W). Then Hk * r = lcm(Hk, W), which divides Hq (a multiple of
  both), and query head h still reads repeated head h // (Hq / (Hk * r)),
  a copy of its kv head h // (Hq / Hk)."""
  return world // math.gcd(hk, world)


def ulysses_to_heads(x, axis_name, world: int, causal: bool):
  """Local zigzag shard [B, 2c, H, D] -> [B, W*2c, H/W, D]: this device's head
  slice over the 2W chunks of its group, in natural order when ``causal``."""
  x = jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True)
  return zigzag_unpermute(x, world, axis=1) if causal else x


def ulysses_to_sequence(x, axis_name, world: int, causal: bool, seq_axis=1, head_axis=2):
  """Inverse of :func:`ulysses_to_heads` (``seq_axis=2, head_axis=1`` for lse)."""
  if causal:
    x = zigzag_permute(x, world, axis=seq_axis)
  return jax.lax.all_to_all(x, axis_name, seq_axis, head_axis, tiled=True)


def _ulysses_attention(problem, cp, run, w_in, q, k, v, qs, ks):
  axis, causal = cp.ulysses_axes, problem.causal
  reps = kv_head_repeats(problem.hk, w_in)
  if reps > 1:   # GQA with Hk % W != 0: whole kv heads per query-head slice
    k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
  heads = lambda x: ulysses_to_heads(x, axis, w_in, causal)
  q, k, v = heads(q), heads(k), heads(v)

  def gather(ids):
    ids = jax.lax.all_gather(ids, axis, axis=1, tiled=True)
    return zigzag_unpermute(ids, w_in, axis=1) if causal else ids

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
  out = ulysses_to_sequence(out, axis, w_in, causal)
  lse = ulysses_to_sequence(lse, axis, w_in, causal, seq_axis=2, head_axis=1)
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

  if not problem.causal:
    # Every row sees every key: the gathered (zigzag) key order is as good as
    # the natural one, so skip the unpermute and the rank switch.
    return call((QueryGroup(0, t, 0, s),), q, k_all, v_all, qs, ks_all)
  unperm = lambda x: None if x is None else zigzag_unpermute(x, world, axis=1)
  k_all, v_all, ks_all = unperm(k_all), unperm(v_all), unperm(ks_all)
  if world == 1:
    return call(zigzag_groups(0, 1, c), q, k_all, v_all, qs, ks_all)
  branches = [functools.partial(call, zigzag_groups(r, world, c)) for r in range(world)]
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


def _step_kinds(spec: _RingSpec, c: int):
  """The static RingSteps: [diagonal] + off-diagonal kinds (indexed by
  ``source > rank`` when causal; one kind when not)."""
  if not spec.causal:
    step = zigzag_ring_step(0, 0, 1, c, causal=False)
    return step, [step]
  diag = zigzag_ring_step(0, 0, 2, c)
  return diag, [zigzag_ring_step(1, 0, 2, c), zigzag_ring_step(0, 1, 2, c)]


def _step_problem(spec: _RingSpec, step, q, k, has_segments: bool) -> Problem:
  b, _, hq, d = q.shape
  return Problem((step.group,), b, step.q_stop - step.q_start,
                 step.kv_stop - step.kv_start, hq, k.shape[2], d, step.causal,
                 spec.scale, has_segments)


def _rows(x, start, stop, axis=1):
  return None if x is None else jax.lax.slice_in_dim(x, start, stop, axis=axis)


def _embed(x, start, stop, length, axis, fill):
  """Pads rows [start, stop) of ``x`` along ``axis`` to ``length`` with ``fill``."""
  if start == 0 and stop == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (start, length - stop)
  return jnp.pad(x, pad, constant_values=fill)


def _step_fwd(spec, step, q, k, v, qs, ks):
  """Partial (out f32 [B, 2c, Hq, D], lse [B, Hq, 2c]) of one ring step."""
  t = q.shape[1]
  problem = _step_problem(spec, step, q, k, qs is not None)
  out, lse = autodiff.attention_fwd(
      problem, spec.backend, spec.config, spec.interpret,
      _rows(q, step.q_start, step.q_stop), _rows(k, step.kv_start, step.kv_stop),
      _rows(v, step.kv_start, step.kv_stop), _rows(qs, step.q_start, step.q_stop),
      _rows(ks, step.kv_start, step.kv_stop))
  out = _embed(out.astype(jnp.float32), step.q_start, step.q_stop, t, 1, 0.0)
  lse = _embed(lse.astype(jnp.float32), step.q_start, step.q_stop, t, 2, -jnp.inf)
  return out, lse


def _step_bwd(spec, step, q, k, v, qs, ks, out, lse, dout, dlse):
  """(dq, dk, dv) float32, full local shapes, of one ring step given the
  final merged out/lse."""
  t = q.shape[1]
  problem = _step_problem(spec, step, q, k, qs is not None)
  qr = lambda x, axis=1: _rows(x, step.q_start, step.q_stop, axis)
  kr = lambda x: _rows(x, step.kv_start, step.kv_stop)
  dq, dk, dv = autodiff.attention_bwd(
      problem, spec.backend, spec.config, spec.interpret, spec.backward,
      qr(q), kr(k), kr(v), qr(qs), kr(ks), qr(out), qr(lse, 2), qr(dout),
      qr(dlse, 2))
  f32 = lambda x: x.astype(jnp.float32)
  return (_embed(f32(dq), step.q_start, step.q_stop, t, 1, 0.0),
          _embed(f32(dk), step.kv_start, step.kv_stop, t, 1, 0.0),
          _embed(f32(dv), step.kv_start, step.kv_stop, t, 1, 0.0))


def _offdiag_index(spec, rank, s):
  """Which off-diagonal kind step ``s`` (traced or static) is on ``rank``."""
  if not spec.causal:
    return 0
  source = (rank - s) % spec.world
  return (source > rank).astype(jnp.int32)


def _choose(index, fns, *args):
  if isinstance(index, int):
    return fns[index](*args)
  return jax.lax.switch(index, fns, *args)


def _ring_forward(spec: _RingSpec, q, k, v, qs, ks):
  axis, world = spec.axis_name, spec.world
  c = q.shape[1] // 2
  diag, kinds = _step_kinds(spec, c)
  fwd = [lambda k, v, ks, kind=kind: _step_fwd(spec, kind, q, k, v, qs, ks)
         for kind in kinds]
  kv = (k, v, ks)
  out, lse = _step_fwd(spec, diag, q, k, v, qs, ks)
  if world == 1:
    return out, lse
  _, rank = axis_size_and_rank(axis)
  out, lse = _pvary(out, axis), _pvary(lse, axis)
  kv = _ppermute(kv, axis, world)

  def step(s, carry):   # kv of rank - s visits; send it on while computing
    kv, out, lse = carry
    nxt = _ppermute(kv, axis, world)   # independent of this step's kernel
    o, l = _choose(_offdiag_index(spec, rank, s), fwd, *kv)
    out, lse = merge_partials(out, lse, o, l)
    return nxt, out, lse

  kv, out, lse = jax.lax.fori_loop(1, world - 1, step, (kv, out, lse))
  o, l = _choose(_offdiag_index(spec, rank, world - 1), fwd, *kv)
  return merge_partials(out, lse, o, l)


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
  c = q.shape[1] // 2
  diag, kinds = _step_kinds(spec, c)
  dout = dout.astype(q.dtype)
  dlse = dlse.astype(jnp.float32)
  local = (q, out, lse, dout, dlse)

  def grads(kind, kv):
    q, out, lse, dout, dlse = local
    k, v, ks = kv
    return _step_bwd(spec, kind, q, k, v, qs, ks, out, lse, dout, dlse)

  bwd = [lambda kv, kind=kind: grads(kind, kv) for kind in kinds]
  kv = (k, v, ks)
  dq, dk, dv = grads(diag, kv)
  if world > 1:
    _, rank = axis_size_and_rank(axis)
    dq, dk, dv = (_pvary(x, axis) for x in (dq, dk, dv))
    kv = _ppermute(kv, axis, world)
    pending = (dk, dv)   # dK, dV of the kv that visited last, not yet sent on

    # Software-pipelined: step s sends on the accumulators of step s-1's kv
    # (they meet kv = this step's visitor on the next rank) and the K, V of
    # step s+1. Neither send depends on this step's kernel, so inside one
    # loop body both can run while it computes.
    def step(s, carry):
      kv, pending, dq = carry
      nxt = _ppermute(kv, axis, world)
      dk, dv = _ppermute(pending, axis, world)
      gq, gk, gv = _choose(_offdiag_index(spec, rank, s), bwd, kv)
      return nxt, (dk + gk, dv + gv), dq + gq

    kv, pending, dq = jax.lax.fori_loop(1, world - 1, step, (kv, pending, dq))
    dk, dv = _ppermute(pending, axis, world)
    gq, gk, gv = _choose(_offdiag_index(spec, rank, world - 1), bwd, kv)
    dq = dq + gq
    dk, dv = _ppermute((dk + gk, dv + gv), axis, world)   # home to their owner
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


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
                               backward="kernel"):
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
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
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
