"""Groups, zigzag math, plans, segment ids and the reference itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_grouped_attn as ga
from cases import CASES, problem_of
from jax_grouped_attn import QueryGroup, plan as plan_lib
from jax_grouped_attn.cp.layout import zigzag_inverse_order, zigzag_order
from jax_grouped_attn.groups import normalize_groups, visible_pairs
from jax_grouped_attn.reference import visible_mask


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zigzag_groups_cover_the_sequence_causally(world):
  c = 5
  seen = np.zeros(2 * world * c, int)
  for r in range(world):
    g0, g1 = ga.zigzag_groups(r, world, c)
    assert g0 == QueryGroup(0, c, r * c, (r + 1) * c)
    assert g1 == QueryGroup(c, c, (2 * world - 1 - r) * c, (2 * world - r) * c)
    perm = zigzag_order(2 * world * c, world)[r * 2 * c:(r + 1) * 2 * c]
    for g in (g0, g1):  # positions of the group's rows are what the permutation says
      np.testing.assert_array_equal(perm[g.q_start:g.q_end], g.q_pos + np.arange(c))
      assert g.kv_len == g.q_pos + c     # causal: kv prefix ends at the chunk end
    seen[perm] += 1
  assert (seen == 1).all()
  np.testing.assert_array_equal(
      zigzag_order(2 * world * c, world)[zigzag_inverse_order(2 * world * c, world)],
      np.arange(2 * world * c))


def test_zigzag_errors_name_the_argument():
  with pytest.raises(ValueError, match="rank"):
    ga.zigzag_groups(2, 2, 4)
  with pytest.raises(ValueError, match="world_size"):
    ga.zigzag_groups(0, 0, 4)
  with pytest.raises(ValueError, match="chunk_len"):
    ga.zigzag_groups(0, 2, 0)
  with pytest.raises(ValueError, match="divisible"):
    zigzag_order(10, 2)


def test_normalize_groups_accepts_any_order():
  gs = (QueryGroup(4, 3, 0, 5), QueryGroup(0, 4, 2, 7))
  assert normalize_groups(gs, 7, 7) == (gs[1], gs[0])


@pytest.mark.parametrize("groups,msg", [
    ((QueryGroup(0, 4, 0, 4), QueryGroup(3, 4, 0, 4)), "overlap"),
    ((QueryGroup(0, 3, 0, 4), QueryGroup(4, 3, 0, 4)), "uncovered"),
    ((QueryGroup(0, 5, 0, 4),), "uncovered"),
    ((QueryGroup(0, 7, 0, 9),), "kv_len"),
    ((QueryGroup(0, 8, 0, 4),), "Tq"),
    ((), "empty"),
])
def test_bad_groups_raise(groups, msg):
  with pytest.raises(ValueError, match=msg):
    normalize_groups(groups, 7, 8)


def test_query_group_field_checks():
  with pytest.raises(TypeError, match="q_len"):
    QueryGroup(0, 2.5, 0, 1)
  with pytest.raises(ValueError, match="kv_len"):
    QueryGroup(0, 2, 0, -1)
  with pytest.raises(ValueError, match="q_start"):
    QueryGroup(-1, 2, 0, 1)
  hash(QueryGroup(0, 1, 0, 1))  # static data: must be hashable


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (128, 64)])
def test_plan_covers_every_row_once_and_bounds_are_exact(case, blocks):
  problem = problem_of(case)
  plan = plan_lib.make_plan(problem, *blocks)
  bk = plan.block_k
  t = plan.table
  work = t[:, plan_lib.N_BLOCKS] - t[:, plan_lib.FIRST]
  assert (np.diff(work) <= 0).all(), "heaviest q blocks first"
  covered = np.zeros(plan.tq_pad, int)
  for row in t:
    covered[row[plan_lib.ROW0]:row[plan_lib.ROW0] + row[plan_lib.N_ROWS]] += 1
  np.testing.assert_array_equal(covered, plan.valid_rows.astype(int))
  np.testing.assert_array_equal(plan.src_rows[plan.dst_rows], np.arange(case.tq))
  mask = np.asarray(visible_mask(problem))[0, 0]          # [Tq, Tk], no segments
  padded_mask = mask[plan.src_rows] & plan.valid_rows[:, None]
  padded_mask = np.pad(padded_mask, ((0, 0), (0, plan.tk_pad - case.tk)))
  for row in t:
    r0, n = row[plan_lib.ROW0], row[plan_lib.N_ROWS]
    blk = padded_mask[r0:r0 + n].reshape(n, -1, bk)
    any_visible = blk.any(axis=(0, 2))
    all_visible = blk.all(axis=(0, 2))
    seen = np.nonzero(any_visible)[0]
    first, full0, nf, nb = (row[c] for c in (plan_lib.FIRST, plan_lib.FULL0, plan_lib.N_FULL,
                                             plan_lib.N_BLOCKS))
    assert first <= full0 <= nf <= nb
    # The visited range is exactly the blocks from the first to the last seen one.
    assert (first, nb) == ((seen[0], seen[-1] + 1) if len(seen) else (0, 0))
    if case.segments:
      assert full0 == nf, "segments: every block is masked"
      continue
    assert all_visible[full0:nf].all(), "an unmasked block hides a masked pair"
    # Exactly the one run of fully visible blocks is unmasked.
    runs = np.nonzero(all_visible)[0]
    if len(runs):
      assert (full0, nf) == (runs[0], runs[-1] + 1)
    else:
      assert full0 == nf


def test_visible_pairs_counts_the_mask():
  for case in CASES:
    problem = problem_of(case)
    mask = np.asarray(visible_mask(problem))
    assert visible_pairs(problem.groups, case.causal, problem.window) == mask.sum()


def test_segment_ids_from_cu_seqlens():
  ids = ga.segment_ids_from_cu_seqlens(np.array([0, 3, 3, 7]), 9)
  np.testing.assert_array_equal(ids, [0, 0, 0, 2, 2, 2, 2, 3, 3])
  batched = ga.segment_ids_from_cu_seqlens(np.array([[0, 2, 4], [0, 4, 4]]), 5)
  np.testing.assert_array_equal(batched, [[0, 0, 1, 1, 2], [0, 0, 0, 0, 2]])
  jitted = jax.jit(ga.segment_ids_from_cu_seqlens, static_argnums=1)(jnp.array([0, 1, 5]), 6)
  np.testing.assert_array_equal(jitted, [0, 1, 1, 1, 1, 2])
  with pytest.raises(ValueError, match="cu_seqlens"):
    ga.segment_ids_from_cu_seqlens(np.array([1, 3]), 5)
  with pytest.raises(ValueError, match="cu_seqlens"):
    ga.segment_ids_from_cu_seqlens(np.array([0, 6]), 5)
  with pytest.raises(ValueError, match="total_len"):
    ga.segment_ids_from_cu_seqlens(np.array([0, 2]), 0)


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 1)])
def test_reference_matches_jax_nn_xla(causal, hq, hk):
  q, k, v = _rand((2, 24, hq, 32), 0), _rand((2, 24, hk, 32), 1), _rand((2, 24, hk, 32), 2)
  got = ga.attention(q, k, v, causal=causal, backend="xla")
  want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_kv_prefix_matches_jax_nn_kv_lengths():
  q, k, v = _rand((2, 16, 4, 32), 3), _rand((2, 24, 4, 32), 4), _rand((2, 24, 4, 32), 5)
  got = ga.grouped_attention(q, k, v, [QueryGroup(0, 16, 0, 19)], causal=False, backend="xla")
  want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([19, 19]),
                                      implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_bottom_right_causal_matches_explicit_mask():
  q, k, v = _rand((1, 6, 2, 32), 6), _rand((1, 10, 2, 32), 7), _rand((1, 10, 2, 32), 8)
  got = ga.attention(q, k, v, causal=True, backend="xla")
  mask = np.arange(10)[None, :] <= (np.arange(6) + 4)[:, None]
  want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None],
                                      implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_segments_match_jax_nn_mask():
  q, k, v = _rand((2, 12, 2, 32), 9), _rand((2, 12, 2, 32), 10), _rand((2, 12, 2, 32), 11)
  seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 2 + [1] * 4 + [2] * 6], jnp.int32)
  got = ga.attention(q, k, v, causal=True, segment_ids=seg, backend="xla")
  mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((12, 12), bool))
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_grads_check_grads_fp64_free():
  q, k, v = _rand((1, 9, 2, 32), 12), _rand((1, 11, 1, 32), 13), _rand((1, 11, 1, 32), 14)
  groups = [QueryGroup(0, 4, 2, 7), QueryGroup(4, 5, 6, 11)]
  f = lambda q, k, v: ga.grouped_attention(q, k, v, groups, backend="xla")
  check_grads(f, (q, k, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


def test_reference_fully_masked_rows_have_zero_grads():
  q, k, v = _rand((1, 8, 2, 32), 15), _rand((1, 8, 2, 32), 16), _rand((1, 8, 2, 32), 17)
  groups = [QueryGroup(0, 3, 0, 0), QueryGroup(3, 5, 3, 8)]
  f = lambda q, k, v: ga.grouped_attention(q, k, v, groups, backend="xla", return_lse=True)
  out, lse = f(q, k, v)
  assert (np.asarray(out[:, :3]) == 0).all() and np.isneginf(np.asarray(lse[:, :, :3])).all()
  dq, dk, dv = jax.grad(lambda *a: jnp.sum(f(*a)[0] * 1.7), argnums=(0, 1, 2))(q, k, v)
  assert np.isfinite(np.asarray(dq)).all() and (np.asarray(dq[:, :3]) == 0).all()
  assert np.isfinite(np.asarray(dk)).all() and np.isfinite(np.asarray(dv)).all()
