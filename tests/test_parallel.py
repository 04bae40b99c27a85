"""Zigzag context parallelism (allgather and ring) vs the single-device reference.

CPU: conftest.py forces 8 host devices, so meshes of 1, 2, 4 and 8 devices run
here. Outputs, lse and gradients (random cotangents for out and lse) are
compared with the fp32 reference on the un-permuted sequence.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_grouped_attn as ga
from cases import (
  KERNEL_BACKENDS,
  SMALL,
  Case,
  assert_matches,
  lowp_grads,
  lowp_reference,
  problem_of,
)
from jax_grouped_attn import autodiff, registry, validate
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.cp import ContextParallel, layout, merge_partials, ring_schedule, ring_steps
from jax_grouped_attn.groups import row_positions, visible
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.vma import pvary, varying_axes

F32, BF16 = jnp.float32, jnp.bfloat16


AXIS_TYPES = ("auto", "explicit")


def _mesh(world, name="cp", axis_type="auto", shape=None):
  """A mesh of ``world`` devices (or ``shape``) whose axes are all Auto or all
  Explicit, whatever ``jax.make_mesh``'s default is in this JAX."""
  shape = shape or (world,)
  names = (name,) if isinstance(name, str) else name
  n = int(np.prod(shape))
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices, have {jax.device_count()}")
  axis_types = getattr(jax.sharding, "AxisType", None)
  if axis_types is None:
    if axis_type == "explicit":
      pytest.skip("this JAX has no Explicit mesh axes")
    return jax.make_mesh(shape, names, devices=jax.devices()[:n])
  kind = getattr(axis_types, axis_type.capitalize())
  return jax.make_mesh(shape, names, devices=jax.devices()[:n],
                       axis_types=(kind,) * len(shape))


def _backward_mode(backend):
  """The backend's backward kernels where it has them, else the reference
  backward (still through the ring's / grouped custom_vjp)."""
  del backend  # every registry entry has a backward
  return "kernel"


def _small(backend):
  """Small kernel tiles; the xla reference takes no config (the registry says so)."""
  return None if backend == "xla" else SMALL


def _inputs(seed, *, b, s, hq, hk, d, dtype, segments):
  """q, k, v, dout, dlse and segment ids (None | "shared" | "split").

  "shared": one segment_ids array (packed documents). "split": separate q/kv
  ids where some query rows carry an id no key has (rows that see nothing).
  """
  rng = np.random.default_rng(seed)
  arr = lambda shape, dt=dtype: jnp.asarray(rng.standard_normal(shape), dt)
  q, k, v = arr((b, s, hq, d)), arr((b, s, hk, d)), arr((b, s, hk, d))
  dout, dlse = arr((b, s, hq, d)), arr((b, hq, s), F32)
  seg = None
  if segments:
    kv_ids = np.sort(rng.integers(0, 4, (b, s)), axis=1)
    if segments == "shared":
      seg = {"segment_ids": jnp.asarray(kv_ids, jnp.int32)}
    else:
      q_ids = kv_ids.copy()
      q_ids[:, ::5] = 99
      seg = {"q_segment_ids": jnp.asarray(q_ids, jnp.int32),
             "kv_segment_ids": jnp.asarray(kv_ids, jnp.int32)}
  return q, k, v, dout, dlse, seg or {}


def _out_lse_grads(fn, q, k, v, dout, dlse):
  """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) under cotangents."""
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  return (out, lse) + vjp((dout, dlse))


def check_context_parallel(world, strategy, backend, *, causal=True, dtype=F32,
                           hq=4, hk=2, d=32, b=1, chunk=16, segments=None, seed=0,
                           config="small", window=None, softcap=None):
  """context_parallel_attention over a ``world``-device mesh == reference
  (config "small": ``_small(backend)``)."""
  mesh = _mesh(world)
  s = 2 * world * chunk
  q, k, v, dout, dlse, seg = _inputs(seed, b=b, s=s, hq=hq, hk=hk, d=d, dtype=dtype,
                                     segments=segments)
  cp = lambda q, k, v: ga.context_parallel_attention(
      q, k, v, mesh, "cp", strategy=strategy, causal=causal, backend=backend,
      return_lse=True, config=_small(backend) if config == "small" else config,
      backward=_backward_mode(backend), local_window_size=window, logits_soft_cap=softcap,
      **seg)
  assert_cp_matches(f"W{world}-{strategy}-{backend}-{window}", cp, q, k, v, dout, dlse, seg,
                    causal=causal, window=window, softcap=softcap)


def assert_cp_matches(name, fn, q, k, v, dout, dlse, seg, *, causal, window=None,
                      softcap=None):
  """fn(q, k, v) -> (out, lse) (context parallel, global arrays) against the
  single-device reference (with ``window`` as local_window_size): out, lse and
  dq/dk/dv under (dout, dlse), each calibrated by the same attention in q's dtype."""
  b, s, hq, d = q.shape
  f32 = lambda x: x.astype(F32)
  ref = lambda q, k, v: ga.attention(q, k, v, causal=causal, backend="xla",
                                     return_lse=True, local_window_size=window,
                                     logits_soft_cap=softcap, **seg)
  want = jax.jit(lambda *a: _out_lse_grads(ref, *a))(f32(q), f32(k), f32(v), f32(dout), dlse)
  got = jax.jit(lambda *a: _out_lse_grads(fn, *a))(q, k, v, dout, dlse)
  assert got[0].dtype == q.dtype and got[0].shape == q.shape
  assert got[1].dtype == F32 and got[1].shape == (b, hq, s)
  # The low-precision reference: the same single-device attention in q's dtype.
  case = Case("cp", (ga.QueryGroup(0, s, 0, s),), s, hq=hq, hk=k.shape[2], d=d, batch=b,
              causal=causal, segments=bool(seg), dtype=q.dtype, window=window, softcap=softcap)
  qs = seg.get("q_segment_ids", seg.get("segment_ids"))
  ks = seg.get("kv_segment_ids", seg.get("segment_ids"))
  lowp = (lowp_reference(case, q, k, v, qs, ks)
          + lowp_grads(case, q, k, v, qs, ks, dout, dlse))
  for tname, g, w, lp in zip(("out", "lse"), got[:2], want[:2], lowp[:2]):
    assert_matches(name, g, w, lp, what=f" {tname}")
  for gname, g, w, lp, x in zip(("dq", "dk", "dv"), got[2:], want[2:], lowp[2:], (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape, f"{gname}: {g.dtype} {g.shape}"
    assert_matches(name, g, w, lp, what=f" {gname}")


# ------------------------------------------------------------- index math --

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_permute_roundtrip(world):
  x = jnp.arange(2 * 3 * 8 * world).reshape(2, 8 * world, 3)
  z = ga.zigzag_permute(x, world)
  np.testing.assert_array_equal(ga.zigzag_unpermute(z, world), x)
  np.testing.assert_array_equal(z[0, :, 0] // 3, ga.zigzag_positions(8 * world, world))
  c = 4
  for r in range(world):   # device r's shard is chunks r and 2W-1-r
    shard = np.asarray(z[0, r * 2 * c:(r + 1) * 2 * c, 0]) // 3
    lo, hi = layout.zigzag_chunks(r, world)
    np.testing.assert_array_equal(shard, np.r_[lo * c:(lo + 1) * c, hi * c:(hi + 1) * c])
  lse = jnp.arange(8 * world)[None, None]   # lse layout [B, H, S]: axis 2
  np.testing.assert_array_equal(
      ga.zigzag_unpermute(ga.zigzag_permute(lse, world, axis=2), world, axis=2), lse)


def _spec_of(x):
  """x's PartitionSpec without trailing Nones (a concrete array's own sharding)."""
  spec = tuple(x.sharding.spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return P(*spec)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("spec,world", [
    (P(None, "cp"), 4),               # split W ways: two ppermutes
    (P("data", "cp"), 4),
    (P(None, ("data", "cp")), 8),
    (P(None, "cp"), 2),               # split 4 ways for W = 2: gathered first
    (P("data"), 4),                   # the sequence axis is whole
    (P(), 4),
], ids=str)
def test_zigzag_permute_keeps_the_sharding(spec, world, axis_type):
  mesh = _mesh(8, ("data", "cp"), axis_type, shape=(2, 4))
  rng = np.random.default_rng(world)
  x = jnp.asarray(rng.standard_normal((2, 16 * world, 3)), F32)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  want = x[:, layout.zigzag_order(16 * world, world)]
  for mode, wrap in (("eager", lambda f: f), ("jit", jax.jit)):
    z = wrap(lambda x: ga.zigzag_permute(x, world))(xs)
    back = wrap(lambda x: ga.zigzag_unpermute(x, world))(z)
    np.testing.assert_array_equal(z, want, err_msg=mode)
    np.testing.assert_array_equal(back, x, err_msg=mode)
    if mode == "eager" or axis_type == "explicit":   # Auto under jit: XLA's choice
      assert _spec_of(z) == _spec_of(xs) == _spec_of(back), (mode, z.sharding, back.sharding)
  if axis_type == "explicit":   # the traced type says so too
    types = []
    jax.jit(lambda x: types.append(jax.typeof(ga.zigzag_permute(x, world))))(xs)
    assert types[0].sharding.spec == jax.typeof(xs).sharding.spec, types


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_zigzag_permute_of_a_split_axis_moves_chunks(axis_type):
  mesh = _mesh(4, "cp", axis_type)
  rng = np.random.default_rng(7)
  x = jax.device_put(jnp.asarray(rng.standard_normal((2, 64, 3)), F32),
                     jax.sharding.NamedSharding(mesh, P(None, "cp")))
  w = jnp.asarray(rng.standard_normal((2, 64, 3)), F32)
  if axis_type == "explicit":
    w = jax.device_put(w, x.sharding)
  for fn in (ga.zigzag_permute, ga.zigzag_unpermute):
    hlo = jax.jit(lambda x: fn(x, 4)).lower(x).compile().as_text()
    if axis_type == "explicit":   # Auto axes under jit: XLA decides (it gathers)
      assert "collective-permute" in hlo and "all-gather" not in hlo, fn.__name__
  # Gradients: the transpose of a permutation is its inverse (JAX wants the
  # mesh context for differentiating on Explicit axes).
  with jax.set_mesh(mesh):
    g = jax.jit(jax.grad(lambda x: jnp.sum(ga.zigzag_permute(x, 4) * w)))(x)
  np.testing.assert_array_equal(g, ga.zigzag_unpermute(w, 4))


def test_zigzag_permute_errors():
  with pytest.raises(ValueError, match="divisible by 2\\*world_size=8"):
    ga.zigzag_permute(jnp.zeros((1, 12, 2, 32)), 4)
  with pytest.raises(ValueError, match="world_size"):
    ga.zigzag_unpermute(jnp.zeros((1, 12)), 0)
  with pytest.raises(ValueError, match="axis=3"):
    ga.zigzag_permute(jnp.zeros((1, 12)), 1, axis=3)


@pytest.mark.parametrize("causal", [True, False])
def test_ring_steps_match_the_global_mask(causal):
  # Every (rank, source) step's mask equals the global mask restricted to the
  # local queries and the visiting keys.
  for world in (1, 2, 3, 5):
    c = 3
    order = layout.zigzag_order(2 * world * c, world)
    for r in range(world):
      q_pos = order[r * 2 * c:(r + 1) * 2 * c]
      for src in range(world):
        k_pos = order[src * 2 * c:(src + 1) * 2 * c]
        want = (k_pos[None] <= q_pos[:, None]) if causal else np.ones((2 * c, 2 * c), bool)
        st = ring_schedule.zigzag_ring_step(r, src, world, c, causal=causal)
        pos, kv_len = row_positions(st.groups, st.q_stop - st.q_start)
        j = np.arange(st.kv_stop - st.kv_start)
        m = j[None] < kv_len[:, None]
        if st.causal:
          m &= j[None] <= pos[:, None]
        got = np.zeros_like(want)
        got[st.q_start:st.q_stop, st.kv_start:st.kv_stop] = m
        np.testing.assert_array_equal(got, want, err_msg=f"{world=} {r=} {src=}")


RING_WINDOWS = [(0, None), (1, None), (3, None), (4, None), (5, None), (9, None), (17, None),
                (None, 0), (2, 0), (0, 2), (3, 5), (8, 1), (None, 7), (13, None)]


@pytest.mark.parametrize("causal", [True, False])
def test_ring_calls_match_the_global_mask_with_windows(causal):
  # Each (rank, source) step's calls cover exactly the visible pairs of the
  # global windowed mask, each pair once (their partials are merged). Without
  # a window the general construction gives zigzag_ring_step's single call.
  windows = [w for w in RING_WINDOWS if not causal or w[0] is not None]
  for world in (1, 2, 3, 5, 8):
    for c in (1, 4):
      order = layout.zigzag_order(2 * world * c, world)
      for window in windows + [None]:
        w = validate.check_window(window, causal)
        for r in range(world):
          q_pos = order[r * 2 * c:(r + 1) * 2 * c]
          for src in range(world):
            k_pos = order[src * 2 * c:(src + 1) * 2 * c]
            want = np.broadcast_to(visible(q_pos[:, None], k_pos[None], 2 * world * c,
                                           causal=causal, window=w), (2 * c, 2 * c))
            calls = ring_schedule.zigzag_ring_calls(r, src, world, c, causal=causal, window=w)
            got = np.zeros((2 * c, 2 * c), int)
            for st in calls:
              pos, kv_len = row_positions(st.groups, st.q_stop - st.q_start)
              j = np.arange(st.kv_stop - st.kv_start)
              got[st.q_start:st.q_stop, st.kv_start:st.kv_stop] += visible(
                  pos[:, None], j[None], kv_len[:, None], causal=st.causal, window=st.window)
            err = f"{world=} {c=} {w=} {r=} {src=} {calls}"
            assert got.max() <= 1, err
            np.testing.assert_array_equal(got.astype(bool), want, err_msg=err)
            general = ring_schedule._ring_calls(layout.zigzag_chunks(r, world),
                                         layout.zigzag_chunks(src, world), c, causal,
                                         w or (None, None))
            if w is None:
              assert general == calls, err
            else:
              assert general == calls and len(calls) <= 2, err


def test_ring_skips_steps_outside_the_window():
  # A causal window of left size L runs steps 0..n and W-n..W-1 only,
  # n = ceil(L / c): min(W, 2n + 1) of W.
  assert ring_steps(4, 1024, True, None) == (0, 1, 2, 3)
  assert ring_steps(4, 1024, True, (512, None)) == (0, 1, 3)
  assert ring_steps(8, 1024, True, (512, None)) == (0, 1, 7)
  assert ring_steps(8, 1024, True, (2048, None)) == (0, 1, 2, 6, 7)
  assert ring_steps(8, 1024, False, (100, 1500)) == (0, 1, 2, 6, 7)
  assert ring_steps(8, 1024, False, (0, 0)) == (0,)   # only the own shard's diagonals
  for world in (1, 2, 4, 8):
    for left in (0, 1, 15, 16, 17, 40, 1000):
      n = -(-left // 16)
      steps = ring_steps(world, 16, True, (left, None))
      assert len(steps) == min(world, 2 * n + 1), (world, left, steps)
  # What runs: with W = 8, c = 16, window 16 (n = 1), K, V move by 1 (step 0 ->
  # 1) and then by 6 (step 1 -> 7), with no loop; without a window a loop
  # moves them by 1 per step. The backward sends dK, dV home by 1 at the end.
  world, s = 8, 8 * 32
  mesh = _mesh(world)
  x = jax.ShapeDtypeStruct((1, s, 2, 32), F32)

  def trace(window):
    fn = lambda q, k, v: ga.context_parallel_attention(
        q, k, v, mesh, "cp", strategy="ring", causal=True, backend="xla",
        local_window_size=window)
    fwd = jax.make_jaxpr(fn)(x, x, x)
    bwd = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)))(x, x, x)
    return _primitives(fwd.jaxpr), _primitives(bwd.jaxpr)

  fwd, bwd = trace((16, None))
  assert not LOOPS & (set(fwd) | set(bwd))
  assert _ring_shifts(fwd, world) == [1, 1, 6, 6]   # k and v
  assert sorted(set(_ring_shifts(bwd, world))) == [1, 6]
  fwd, _ = trace(None)
  assert LOOPS & set(fwd) and set(_ring_shifts(fwd, world)) == {1}


LOOPS = {"while", "scan"}   # fori_loop with static bounds is a scan


def _primitives(jaxpr):
  """{primitive name: [eqn params]} of ``jaxpr`` and all its sub-jaxprs."""
  found = {}

  def walk(j):
    for eqn in j.eqns:
      found.setdefault(eqn.primitive.name, []).append(eqn.params)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr)
  return found


def _ring_shifts(prims, world):
  """How far each ring ppermute moves its data (the ones that rotate every rank
  by the same shift; the zigzag shuffles are not rotations)."""
  shifts = []
  for params in prims.get("ppermute", []):
    moves = {(dst - src) % world for src, dst in params["perm"]}
    if len(params["perm"]) == world and len(moves) == 1:
      shifts.append(moves.pop())
  return sorted(shifts)


def test_merge_partials_is_exact_and_nan_free():
  rng = np.random.default_rng(0)
  b, t, h, d = 1, 6, 2, 8
  o1, o2 = (jnp.asarray(rng.standard_normal((b, t, h, d)), F32) for _ in range(2))
  l1, l2 = (jnp.asarray(rng.standard_normal((b, h, t)), F32) for _ in range(2))
  inf = jnp.full((b, h, t), -jnp.inf)
  l1 = l1.at[:, :, :2].set(-jnp.inf)   # rows 0-1 saw nothing in part 1
  l2 = l2.at[:, :, 1:3].set(-jnp.inf)  # rows 1-2 nothing in part 2: row 1 nothing at all
  o1 = jnp.where(jnp.isinf(l1).transpose(0, 2, 1)[..., None], 0.0, o1)
  o2 = jnp.where(jnp.isinf(l2).transpose(0, 2, 1)[..., None], 0.0, o2)
  out, lse = merge_partials(o1, l1, o2, l2)
  assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
  np.testing.assert_allclose(np.asarray(lse), np.asarray(jnp.logaddexp(l1, l2)), rtol=1e-6,
                             atol=1e-6)
  w1 = jnp.exp(l1 - lse).transpose(0, 2, 1)[..., None]
  w2 = jnp.exp(l2 - lse).transpose(0, 2, 1)[..., None]
  ok = np.isfinite(np.asarray(lse)).transpose(0, 2, 1)[..., None]
  np.testing.assert_allclose(np.asarray(out), np.where(ok, np.asarray(w1 * o1 + w2 * o2), 0),
                             rtol=1e-5, atol=1e-6)
  assert (np.asarray(out[:, 1]) == 0).all() and np.isneginf(np.asarray(lse[:, :, 1])).all()
  out, lse = merge_partials(o1, inf, jnp.zeros_like(o1), inf)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_pvary_marks_values_varying_inside_shard_map():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("cp",))

  def f(x):
    z = jnp.zeros(x.shape)   # invariant: the same on every device
    assert varying_axes(x) == {"cp"} and varying_axes(z) == frozenset()
    assert varying_axes(pvary(z, "cp")) == {"cp"}
    assert pvary(x, "cp") is x
    return x

  jax.shard_map(f, mesh=mesh, in_specs=P("cp"), out_specs=P("cp"))(jnp.zeros(4))


# ---------------------------------------------------- xla backend, W = 1..8 --

XLA_MATRIX = [
    # (world, causal, dtype, hq, hk, segments)
    (1, True, F32, 4, 2, None),
    (2, False, BF16, 8, 2, "shared"),
    (4, True, F32, 4, 4, "split"),   # rows that see no key at all
    (8, True, BF16, 4, 2, None),
]


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("world,causal,dtype,hq,hk,segments", XLA_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_xla_backend_matches_reference(world, causal, dtype, hq, hk, segments, strategy):
  check_context_parallel(world, strategy, "xla", causal=causal, dtype=dtype, hq=hq,
                         hk=hk, segments=segments, b=2, seed=world)


WINDOW_MATRIX = [
    # (world, causal, window, dtype, hq, hk, segments)
    (2, True, (5, None), F32, 4, 2, None),          # a few rows of the neighbour chunk
    (4, True, (40, None), BF16, 4, 1, "shared"),    # wider than two chunks; MQA; documents
    (4, False, (3, 9), F32, 4, 2, None),            # both sides, non-causal
    (4, False, (None, 20), F32, 2, 2, "split"),     # right side only; rows that see nothing
    (8, True, (16, None), F32, 4, 2, None),         # one chunk: ring steps 0, 1, 7 of 8
]


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("world,causal,window,dtype,hq,hk,segments", WINDOW_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_sliding_window_matches_reference(world, causal, window, dtype, hq, hk, segments,
                                          strategy):
  check_context_parallel(world, strategy, "xla", causal=causal, dtype=dtype, hq=hq, hk=hk,
                         segments=segments, b=2, seed=60 + world, window=window)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_sliding_window_with_kernel_backends(strategy, backend):
  # Runs once the backend has window kernels (supports() accepts the window).
  world, chunk, window = 2, 16, (11, None)
  case = Case("cp_window", (ga.QueryGroup(0, 2 * chunk, 0, 2 * chunk),), 2 * chunk, hq=4,
              hk=2, d=32, batch=1, dtype=BF16, window=window)
  why = registry.get(backend).supports(problem_of(case), BF16)
  if why is not None:
    pytest.skip(why)
  check_context_parallel(world, strategy, backend, dtype=BF16, chunk=chunk,
                         segments="split", seed=70, window=window)


# ------------------------------------------------- logit soft-capping --

SOFTCAP_MATRIX = [
    # (world, strategy, backend, causal, window)
    (4, "ring", "xla", True, None),
    (2, "ring", "triton", True, (11, None)),
    (4, "allgather", "xla", True, (11, None)),
    (2, "allgather", "triton", False, None),
    (4, "ulysses", "xla", True, None),
    (2, "ulysses", "triton", True, None),
]


@pytest.mark.parametrize("world,strategy,backend,causal,window", SOFTCAP_MATRIX)
def test_soft_cap_in_every_strategy(world, strategy, backend, causal, window):
  # The cap is per score, so each strategy's calls cap their own scores and
  # the ring's lse merge of capped partials stays exact.
  if backend not in KERNEL_BACKENDS + ["xla"]:
    pytest.skip(f"{backend} does not run here")
  check_context_parallel(world, strategy, backend, causal=causal, dtype=BF16, hq=4, hk=2,
                         segments="split", seed=80 + world, window=window, softcap=0.8)


def test_soft_cap_in_2d_context_parallelism():
  mesh = _mesh(4, ("node", "gpu"), shape=(2, 2))
  q, k, v, dout, dlse, seg = _inputs(85, b=1, s=64, hq=4, hk=2, d=32, dtype=F32,
                                     segments=None)
  cp = lambda q, k, v: ga.context_parallel_attention(
      q, k, v, mesh, "node", strategy="ring", ulysses_axis_name="gpu", causal=True,
      backend="xla", return_lse=True, logits_soft_cap=0.8)
  assert_cp_matches("2d-ring-softcap", cp, q, k, v, dout, dlse, seg, causal=True, softcap=0.8)


# ------------------------------------------------------ attention sinks --

@pytest.mark.parametrize("world,strategy,backend", [
    (4, "ring", "xla"), (2, "ring", "triton"), (4, "allgather", "xla"),
    (2, "ulysses", "triton"), (4, "ring+ulysses", "xla")])
def test_sinks_in_every_strategy(world, strategy, backend):
  # The sink enters each row's softmax once (applied to the merged result, not
  # per ring step): out, lse and the gradients of q, k, v and the sinks against
  # the formula.
  from test_sinks import formula as sink_formula  # noqa: PLC0415
  if backend not in KERNEL_BACKENDS + ["xla"]:
    pytest.skip(f"{backend} does not run here")
  two_d = "+" in strategy
  mesh = _mesh(world, ("node", "gpu"), shape=(2, 2)) if two_d else _mesh(world)
  q, k, v, dout, dlse, _ = _inputs(90 + world, b=1, s=2 * world * 16, hq=4, hk=2, d=32,
                                   dtype=F32, segments=None)
  sinks = jnp.asarray(np.random.default_rng(world).standard_normal(4), F32)
  axis, kw = ("node", dict(ulysses_axis_name="gpu")) if two_d else ("cp", {})
  cp = lambda q, k, v, s: ga.context_parallel_attention(
      q, k, v, mesh, axis, strategy=strategy.split("+")[0], causal=True, backend=backend,
      return_lse=True, config=_small(backend), sinks=s, **kw)
  ref = sink_formula   # the softmax with the sink column, written out (test_sinks.py)

  def all_of(fn, *a):
    (out, lse), vjp = jax.vjp(fn, *a)
    return (out, lse) + vjp((dout, dlse))

  got = jax.jit(lambda *a: all_of(cp, *a))(q, k, v, sinks)
  want = jax.jit(lambda *a: all_of(ref, *a))(q, k, v, sinks)
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_array_equal(np.isinf(g), np.isinf(w), err_msg=name)
    fin = np.isfinite(w)
    err = float(np.max(np.abs(g[fin] - w[fin])))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(w[fin])))), (name, err)


# ------------------------------------------ kernel backends (interpreted) --

KERNEL_MATRIX = [
    # (world, strategy, causal, dtype, hq, hk, segments)
    (2, "allgather", True, BF16, 4, 2, "split"),
    (2, "ring", True, BF16, 4, 2, "split"),
    (4, "ring", True, F32, 2, 1, "shared"),
    (2, "ring", False, F32, 2, 2, "split"),
    (2, "allgather", True, F32, 4, 1, "shared"),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("world,strategy,causal,dtype,hq,hk,segments", KERNEL_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_kernel_backends_match_reference(world, strategy, causal, dtype, hq, hk, segments,
                                         backend):
  check_context_parallel(world, strategy, backend, causal=causal, dtype=dtype, hq=hq,
                         hk=hk, segments=segments, seed=10 + world)


# ------------------------------------------------ user-written shard_map --

@pytest.mark.parametrize("backend", ["xla", "triton"])
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_attention_inside_user_shard_map_under_jit(strategy, backend):
  # The documented pattern: permute once, shard_map over a real Mesh (Auto
  # axes, check_vma on), per-device positions from zigzag_positions.
  world, b, s, h, d = 4, 2, 64, 2, 32
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:world]), ("data_cp",))
  q, k, v, dout, dlse, _ = _inputs(3, b=b, s=s, hq=h, hk=h, d=d, dtype=F32, segments=None)
  pos = jnp.asarray(ga.zigzag_positions(s, world))
  cp = ContextParallel("data_cp", strategy)

  def local(q, k, v, pos):
    # RoPE-style use of the local positions: rotate q, k by position parity.
    sign = jnp.where(pos % 2 == 0, 1.0, -1.0)[None, :, None, None]
    return ga.attention(q * sign, k * sign, v, causal=True, backend=backend,
                        context_parallel=cp, config=_small(backend))

  spec = P(None, "data_cp")
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P("data_cp")),
                     out_specs=spec)
  perm = lambda x: ga.zigzag_permute(x, world)
  out = ga.zigzag_unpermute(jax.jit(fn)(perm(q), perm(k), perm(v), pos), world)
  sign = jnp.where(jnp.arange(s) % 2 == 0, 1.0, -1.0)[None, :, None, None]
  plain = lambda q, k, v: ga.attention(q * sign, k * sign, v, causal=True, backend="xla")
  assert_matches("user_shard_map", out, plain(q, k, v))
  # Gradients through the user's shard_map (check_vma on) match the plain call.
  w = ga.zigzag_permute(dout, world)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, pos) * w), argnums=(0, 1, 2)))(
      perm(q), perm(k), perm(v))
  want = jax.grad(lambda *a: jnp.sum(plain(*a) * dout), argnums=(0, 1, 2))(q, k, v)
  for name, g, x in zip("qkv", got, want):
    assert_matches(f"user_shard_map d{name}", ga.zigzag_unpermute(g, world), x)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_batch_axis_and_tuple_context_axis(axis_type):
  # 3-D mesh: batch over "data", the sequence over the pair ("x", "y") (W = 4).
  mesh = _mesh(8, ("data", "x", "y"), axis_type, shape=(2, 2, 2))
  q, k, v, dout, dlse, seg = _inputs(4, b=2, s=64, hq=4, hk=2, d=32, dtype=F32,
                                     segments="shared")
  fn = jax.jit(lambda q, k, v: ga.context_parallel_attention(
      q, k, v, mesh, ("x", "y"), strategy="ring", causal=True, batch_axis_name="data",
      backend="xla", **seg))
  want = ga.attention(q, k, v, causal=True, backend="xla", **seg)
  got = fn(q, k, v)
  assert_matches("2d_mesh", got, want)
  assert _spec_of(got) == P("data", ("x", "y")), got.sharding


# ------------------------------------------------- Explicit mesh axes --

@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_context_parallel_on_explicit_axes_jit_and_eager(strategy):
  # jax.make_mesh's default axes in new JAX: forward and gradients under jit,
  # eager forward, and eager gradients inside jax.set_mesh (JAX's rule).
  mesh = _mesh(4, "cp", "explicit")
  q, k, v, dout, dlse, seg = _inputs(21, b=2, s=64, hq=4, hk=2, d=32, dtype=F32,
                                     segments="shared")
  cp = lambda q, k, v: ga.context_parallel_attention(
      q, k, v, mesh, "cp", strategy=strategy, causal=True, backend="xla",
      return_lse=True, **seg)
  ref = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla", return_lse=True,
                                     **seg)
  want = _out_lse_grads(ref, q, k, v, dout, dlse)
  got = jax.jit(lambda *a: _out_lse_grads(cp, *a))(q, k, v, dout, dlse)
  eager_out, eager_lse = cp(q, k, v)
  with jax.set_mesh(mesh):
    eager_grads = _out_lse_grads(cp, q, k, v, dout, dlse)[2:]
  assert _spec_of(eager_out) == P(None, "cp") and _spec_of(eager_lse) == P(None, None, "cp")
  assert jax.typeof(got[0]).sharding.spec[:2] == (None, "cp")
  for name, g, w in zip(("out", "lse"), (got[0], got[1], eager_out, eager_lse), want * 2):
    assert_matches(f"explicit-{strategy}", g, w, what=f" {name}")
  grads = list(zip(("dq", "dk", "dv"), got[2:], want[2:])) + list(
      zip(("eager dq", "eager dk", "eager dv"), eager_grads, want[2:]))
  for name, g, w in grads:
    assert_matches(f"explicit-{strategy}", g, w, what=f" {name}")


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_user_shard_map_on_explicit_axes(strategy):
  # The README's pattern on jax.make_mesh's Explicit axes: inputs sharded in
  # natural order, zigzag_permute keeps the sharding, so shard_map's in_specs
  # match; zigzag_unpermute of its output keeps it too.
  world, s = 4, 64
  mesh = _mesh(world, "cp", "explicit")
  q, k, v, dout, dlse, seg = _inputs(22, b=2, s=s, hq=4, hk=2, d=32, dtype=F32,
                                     segments="shared")
  seg = seg["segment_ids"]
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, "cp")))
  cp = ContextParallel("cp", strategy)

  @jax.jit
  def step(q, k, v, seg):
    spec = P(None, "cp")
    fn = jax.shard_map(lambda q, k, v, seg: ga.attention(
        q, k, v, causal=True, segment_ids=seg, backend="xla", context_parallel=cp),
        mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    zz = [ga.zigzag_permute(x, world) for x in (q, k, v, seg)]
    return ga.zigzag_unpermute(fn(*zz), world)

  out = step(*(put(x) for x in (q, k, v, seg)))
  assert _spec_of(out) == P(None, "cp"), out.sharding
  want = ga.attention(q, k, v, causal=True, backend="xla", segment_ids=seg)
  assert_matches(f"user-explicit-{strategy}", out, want)


def test_errors_are_clear():
  with pytest.raises(ValueError, match="strategy='tree' is unknown"):
    ContextParallel("cp", "tree")
  with pytest.raises(TypeError, match="axis_name"):
    ContextParallel(3)
  q = jnp.zeros((1, 32, 2, 32))
  with pytest.raises(ValueError, match="'cp' is not bound"):
    ga.attention(q, q, q, causal=True, backend="xla", context_parallel=ContextParallel("cp"))
  with pytest.raises(TypeError, match="ContextParallel"):
    ga.attention(q, q, q, backend="xla", context_parallel="cp")
  mesh = _mesh(4)
  with pytest.raises(ValueError, match="divisible by 2 \\* world_size = 8"):
    ga.context_parallel_attention(jnp.zeros((1, 36, 2, 32)), *(jnp.zeros((1, 36, 2, 32)),) * 2,
                                  mesh, "cp", backend="xla")
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    ga.context_parallel_attention(q, q, q, mesh, "sp", backend="xla")
  # Local shards of different lengths / odd length, inside shard_map.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("cp",))
  sm = lambda f, n: jax.shard_map(f, mesh=mesh, in_specs=(P(None, "cp"),) * n,
                                  out_specs=P(None, "cp"))
  with pytest.raises(ValueError, match="must have equal length"):
    sm(lambda q, k: ga.attention(q, k, k, backend="xla",
                                 context_parallel=ContextParallel("cp")), 2)(
                                     q, jnp.zeros((1, 64, 2, 32)))
  with pytest.raises(ValueError, match="must be even"):
    sm(lambda q: ga.attention(q, q, q, backend="xla", context_parallel=ContextParallel("cp")),
       1)(jnp.zeros((1, 12, 2, 32)))


# ------------------------------------------------ communication and memory --

def _shard_mapped_vjp(strategy, world, local_len, hq=2, hk=1, d=32, backend="xla"):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:world]), ("cp",))
  cp = ContextParallel("cp", strategy)

  def local(q, k, v, dout):
    f = lambda q, k, v: ga.attention(q, k, v, causal=True, backend=backend,
                                     context_parallel=cp)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(dout)

  spec = P(None, "cp")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))
  sq = jax.ShapeDtypeStruct((1, local_len * world, hq, d), F32)
  sk = jax.ShapeDtypeStruct((1, local_len * world, hk, d), F32)
  return fn.lower(sq, sk, sk, sq)


def test_allgather_backward_is_a_reduce_scatter():
  world, local_len = 4, 32
  lowered = _shard_mapped_vjp("allgather", world, local_len)
  hlo = lowered.compile().as_text()
  scatters = re.findall(r"= (\S+) reduce-scatter\(", hlo)
  assert len(scatters) == 2, scatters   # dK and dV
  for shape in scatters:   # each back to the local shard size
    assert f"[1,{local_len},1,32]" in shape, shape
  assert "all-reduce(" not in hlo
  assert len(re.findall(r" all-gather\(", hlo)) >= 2


def test_ring_memory_does_not_grow_with_world_size():
  # Fixed local length: the ring's temporaries stay O(local shard) while the
  # all-gather's gathered K, V grow with W (so the measure is meaningful).
  local_len = 64
  compiled = {(strategy, world): _shard_mapped_vjp(strategy, world, local_len).compile()
              for strategy, world in (("ring", 2), ("ring", 8), ("allgather", 2),
                                      ("allgather", 4))}
  temp = {key: c.memory_analysis().temp_size_in_bytes for key, c in compiled.items()}
  assert temp["ring", 8] <= 1.05 * temp["ring", 2], temp
  assert temp["allgather", 4] > 1.5 * temp["allgather", 2], temp
  # No ring buffer exceeds the local shard's sequence length.
  hlo = compiled["ring", 8].as_text()
  lengths = {int(m) for m in re.findall(r"f32\[1,(\d+),\d+,32\]", hlo)}
  assert lengths and max(lengths) <= local_len, lengths


# --------------------------------------------------------- multi-process --

def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_processes_on_one_machine():
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0 and f"OK {i}" in log, f"process {i} rc={p.returncode}:\n{log[-3000:]}"


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_multi_gpu_matches_reference(strategy, backend):
  if jax.device_count() < 2:
    pytest.skip(f"needs >= 2 GPUs for context parallelism, have {jax.device_count()}")
  world = 2 ** int(np.log2(min(jax.device_count(), 8)))
  check_context_parallel(world, strategy, backend, causal=True, dtype=BF16, hq=8, hk=2,
                         d=128, b=2, chunk=256, segments="shared", seed=5,
                         config=None)


# ---------------------------------------- a user's own shard_map, check_vma on --

def _q_sharded(backend, check_vma=True, causal=False):
  """Each device attends its slice of query rows to the full, replicated K,V:
  dK, dV are sums over devices (the transpose of marking K,V varying)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
  attn = lambda q, k, v: ga.attention(q, k, v, causal=causal, backend=backend,
                                      config=_small(backend))
  return jax.shard_map(attn, mesh=mesh, in_specs=(P(None, "sp"), P(), P()),
                       out_specs=P(None, "sp"), check_vma=check_vma), attn


@pytest.mark.parametrize("backend", ["xla", "triton"])
def test_kernels_in_user_shard_map_with_check_vma(backend):
  rng = np.random.default_rng(40)
  q = jnp.asarray(rng.standard_normal((2, 32, 4, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 32)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  sharded, plain = _q_sharded(backend)
  assert_matches("out", jax.jit(sharded)(q, k, v), plain(q, k, v))
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
  got = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
  for name, g, x in zip("qkv", got, want):
    assert_matches(f"d{name}", g, x)


def test_pallas_interpret_in_check_vma_shard_map_says_what_to_do():
  # Random q, k, v (with equal values every output would be v whatever the
  # weights); causal, so the q shard's own mask matters too.
  rng = np.random.default_rng(41)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 2, 32)), jnp.float32) for _ in range(3))
  sharded, _ = _q_sharded("pallas", causal=True)
  with pytest.raises(ValueError, match="interpret mode.*check_vma=True.*check_vma=False"):
    sharded(q, k, v)
  unchecked, plain = _q_sharded("pallas", check_vma=False, causal=True)
  # Device i holds q rows [16 i, 16 i + 16): bottom-right causal against the
  # full k, v is the plain call on that slice.
  got = unchecked(q, k, v)
  want = jnp.concatenate([plain(q[:, :16], k, v), plain(q[:, 16:], k, v)], axis=1)
  assert_matches("out", got, want)
  assert not np.allclose(np.asarray(got), np.asarray(ga.attention(q, k, v, causal=True,
                                                                  backend="xla")))


def test_pallas_gpu_kernels_lower_in_check_vma_shard_map():
  # The compiled (not interpreted) Pallas path: lowered for CUDA on any machine.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("dp",))
  problem = Problem((ga.QueryGroup(0, 128, 0, 128),), 1, 128, 128, 2, 2, 64, True,
                             0.125, False)
  attn = lambda q, k, v: autodiff.differentiable(problem, Kernels.both("pallas_triton"), q, k, v,
                                            None, None)[0]
  f = jax.shard_map(attn, mesh=mesh, in_specs=(P("dp"),) * 3, out_specs=P("dp"),
                    check_vma=True)
  q = jnp.ones((2, 128, 2, 64), jnp.bfloat16)
  grad = jax.grad(lambda q: jnp.sum(f(q, q, q).astype(jnp.float32)))
  text = jax.jit(grad).trace(q).lower(lowering_platforms=("cuda",)).as_text()
  names = set(re.findall(r'name = "(grouped_attention_\w+)"', text))
  assert {"grouped_attention_fwd", "grouped_attention_bwd_dkdv",
          "grouped_attention_bwd_dq"} <= names, names
