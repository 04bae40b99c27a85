"""Numerics at the edges, determinism and JAX transformations, for every kernel backend.

NaN/inf contract (documented in README): a non-finite value in q row i makes
only row i (that batch entry and head) non-finite. A non-finite value in k or
v at key j reaches the rows that see key j and may also reach rows processed
together with it (0 * NaN): rows of the same kernel tile, or for the xla
reference every row of that batch entry and kv head. Other batch entries and
kv heads stay clean.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import (
  KERNEL_BACKENDS,
  SMALL,
  Case,
  assert_close,
  assert_matches,
  case_by_name,
  lowp_reference,
  make_inputs,
  reference,
)
from jax_grouped_attn import QueryGroup
from jax_grouped_attn.pallas.mosaic.config import MosaicForwardConfig

ALL_BACKENDS = ["xla"] + KERNEL_BACKENDS


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_huge_and_tiny_logits(backend, scale):
  q, k, v = _rand((1, 40, 2, 32), 0), _rand((1, 40, 2, 32), 1), _rand((1, 40, 2, 32), 2)
  kw = dict(causal=True, softmax_scale=scale / np.sqrt(32), return_lse=True)
  out, lse = ga.attention(q, k, v, backend=backend, config=SMALL, **kw)
  ref_out, ref_lse = ga.attention(q, k, v, backend="xla", **kw)
  # At 1e4 x the logits are ~1e4: one ulp of a logit moves weights by ~1e-3
  # (ill-conditioned, not a precision choice: no calibrated tolerance here).
  tol = (2e-5, 2e-5) if scale < 1 else (5e-3, 5e-3)
  assert_close("scale", out, ref_out, tol)
  assert_close("scale", lse, ref_lse, (tol[0] * scale, tol[1]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bf16_accumulates_in_fp32(backend):
  # 2048 keys in 128 blocks of 16: a bf16 running sum (acc, l) or a bf16 max
  # would add ~128 roundings of 2^-9. Random q, k, v (weights spread over
  # many keys, every output different) so out and lse can show it; compared
  # under the calibrated tolerance with the plain bf16 attention.
  case = Case("acc2048", (QueryGroup(0, 16, 0, 2048),), 2048, hq=1, hk=1, d=32, batch=1,
              causal=False, dtype=jnp.bfloat16)
  q, k, v = (_rand(s, i, jnp.bfloat16) for i, s in
             enumerate([(1, 16, 1, 32), (1, 2048, 1, 32), (1, 2048, 1, 32)], start=3))
  out, lse = ga.attention(q, k, v, backend=backend, return_lse=True,
                          config=ga.AttentionConfig(forward=(
                              ga.ForwardConfig(block_q=16, block_k=16),
                              MosaicForwardConfig(block_kv=128, compute_wgs=1))))
  ref_out, ref_lse = reference(case, q, k, v, None, None)
  lp_out, lp_lse = lowp_reference(case, q, k, v, None, None)
  assert_matches("acc", out, ref_out, lp_out)
  assert_matches("acc", lse, ref_lse, lp_lse)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_q_row_stays_in_that_row(backend):
  q, k, v = _rand((2, 32, 2, 32), 5), _rand((2, 32, 1, 32), 6), _rand((2, 32, 1, 32), 7)
  q = q.at[1, 9, 0, 3].set(jnp.nan)
  out = np.asarray(ga.attention(q, k, v, causal=True, backend=backend, config=SMALL))
  bad = ~np.isfinite(out)
  assert bad[1, 9, 0].all()
  bad[1, 9, 0] = False
  assert not bad.any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inf_in_kv_stays_in_its_batch_and_head(backend):
  q, k, v = _rand((2, 32, 4, 32), 8), _rand((2, 32, 2, 32), 9), _rand((2, 32, 2, 32), 10)
  k = k.at[0, 20, 1, 0].set(jnp.inf)
  v = v.at[0, 20, 1, 5].set(jnp.nan)
  out = np.asarray(ga.attention(q, k, v, causal=True, backend=backend, config=SMALL))
  assert not np.isfinite(out[0, 20:, 2:]).all(axis=-1).any()   # rows that see key 20
  assert np.isfinite(out[1]).all() and np.isfinite(out[0, :, :2]).all()
  if backend != "xla":
    assert np.isfinite(out[0, :16, 2:]).all()                  # other q tiles stay clean


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_rows_zero_out_and_grads(backend):
  q, k, v = _rand((1, 24, 2, 32), 11), _rand((1, 30, 2, 32), 12), _rand((1, 30, 2, 32), 13)
  groups = [QueryGroup(0, 8, -8, 30), QueryGroup(8, 16, 5, 0)]   # rows 0-7: pos < 0; 8-23: kv 0
  f = lambda q, k, v: ga.grouped_attention(q, k, v, groups, backend=backend, return_lse=True,
                                           config=SMALL)
  out, lse = f(q, k, v)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  grads = jax.grad(lambda *a: jnp.sum(f(*a)[0] * 3.0), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert (np.asarray(g) == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bitwise_deterministic_forward_and_backward(backend):
  case = case_by_name("zigzag_r2w4c13")
  q, k, v, _, _ = make_inputs(case, 3)
  dout = _rand(q.shape, 4)
  f = jax.jit(lambda q, k, v: jax.vjp(
      lambda *a: ga.grouped_attention(*a, case.groups, backend=backend, config=SMALL),
      q, k, v)[1](dout))
  g = jax.jit(lambda q, k, v: ga.grouped_attention(q, k, v, case.groups, backend=backend,
                                                   config=SMALL))
  for fn in (f, g):
    a, b = fn(q, k, v), fn(q, k, v)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("segments", [False, True])
def test_bitwise_deterministic_on_gpu_default_tiles(backend, segments):
  # Realistic size, default (tuned) tiles: many programs per launch, so a
  # run-order dependence (atomics, split reductions) would show up here.
  w, chunk = 4, 512
  groups = ga.zigzag_groups(1, w, chunk)
  tk = 2 * w * chunk
  q = _rand((2, 2 * chunk, 16, 128), 20, jnp.bfloat16)
  k, v = _rand((2, tk, 4, 128), 21, jnp.bfloat16), _rand((2, tk, 4, 128), 22, jnp.bfloat16)
  dout = _rand(q.shape, 23, jnp.bfloat16)
  seg = {}
  if segments:
    ids = jnp.asarray(np.repeat(np.arange(tk // 700 + 1), 700)[:tk], jnp.int32)[None].repeat(2, 0)
    pos = jnp.concatenate([jnp.arange(g.q_pos, g.q_pos + g.q_len) for g in groups])
    seg = dict(q_segment_ids=ids[:, pos], kv_segment_ids=ids)
  f = lambda *a: ga.grouped_attention(*a, groups, backend=backend, return_lse=True, **seg)
  run = jax.jit(lambda q, k, v: (f(q, k, v), jax.vjp(lambda *a: f(*a)[0], q, k, v)[1](dout)))
  first = jax.tree.leaves(run(q, k, v))
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in first)
  for _ in range(3):
    again = jax.tree.leaves(run(q, k, v))
    for x, y in zip(first, again):
      assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_vmap_over_extra_leading_axis(backend):
  q, k, v = _rand((3, 2, 20, 4, 32), 14), _rand((3, 2, 20, 2, 32), 15), _rand((3, 2, 20, 2, 32), 16)
  f = lambda q, k, v: ga.attention(q, k, v, causal=True, backend=backend, config=SMALL)
  got = jax.jit(jax.vmap(f))(q, k, v)
  want = jnp.stack([f(q[i], k[i], v[i]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  got = jax.vmap(f, in_axes=(0, None, None))(q, k[0], v[0])     # unbatched k, v
  want = jnp.stack([f(q[i], k[0], v[0]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  dq = jax.grad(lambda q: jnp.sum(jax.vmap(f)(q, k, v) * v[..., :1, :].mean()))(q)
  dq_loop = jnp.stack([jax.grad(lambda x: jnp.sum(f(x, k[i], v[i]) * v[..., :1, :].mean()))(q[i])
                       for i in range(3)])
  np.testing.assert_allclose(np.asarray(dq), np.asarray(dq_loop), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_checkpoint_eval_shape_and_donation(backend):
  case = case_by_name("two_groups_gap_pos")
  q, k, v, _, _ = make_inputs(case, 5)
  f = lambda q, k, v: ga.grouped_attention(q, k, v, case.groups, backend=backend, config=SMALL)
  shape = jax.eval_shape(f, q, k, v)
  assert shape.shape == q.shape and shape.dtype == q.dtype
  loss = lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
  g1 = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))(q, k, v)
  g2 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
  want = f(q, k, v)
  donated = jax.jit(f, donate_argnums=(0,))(jnp.array(q), k, v)
  np.testing.assert_array_equal(np.asarray(donated), np.asarray(want))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_jax_export_round_trip(backend):
  # The Triton backend on CPU goes through a host callback, which jax.export
  # cannot serialise; xla and Pallas (interpret) lower to plain XLA here.
  from jax import export
  case = case_by_name("zigzag_r0w2c16")
  q, k, v, _, _ = make_inputs(case, 6)
  f = jax.jit(lambda q, k, v: ga.grouped_attention(q, k, v, case.groups, backend=backend,
                                                   config=SMALL))
  exp = export.deserialize(export.export(f)(q, k, v).serialize())
  np.testing.assert_allclose(np.asarray(exp.call(q, k, v)), np.asarray(f(q, k, v)),
                             atol=1e-6, rtol=1e-6)
