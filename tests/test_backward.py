"""Backward kernels of every backend vs the fp32 reference's autodiff."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads as jax_check_grads

import jax_grouped_attn as ga
from cases import (
  CASES,
  KERNEL_BACKENDS,
  SMALL,
  assert_matches,
  case_by_name,
  check_grads,
  make_inputs,
  problem_of,
  seed_of,
)
from jax_grouped_attn import autodiff, plan as plan_lib, registry
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.reference import visible_mask

# Backends whose backward kernels are under test.
BACKWARD_BACKENDS = KERNEL_BACKENDS

BWD_KERNELS = ("grouped_attention_bwd_delta", "grouped_attention_bwd_dkdv",
               "grouped_attention_bwd_dq")


def _attn(case, backend, qs=None, ks=None, **kw):
  kw.setdefault("config", SMALL)
  return lambda q, k, v: ga.grouped_attention(
      q, k, v, case.groups, causal=case.causal, q_segment_ids=qs, kv_segment_ids=ks,
      backend=backend, return_lse=True, local_window_size=case.window, **kw)


def _assert_grads_close(name, got, want):
  """fp32 gradients vs the fp32 reference's (calibrated: fp32 floor)."""
  for n, g, w in zip("qkv", got, want):
    assert_matches(name, g, w, what=f" d{n}")


# ------------------------------------------------------------------- plan --

# dK/dV tiles (block_q, block_k) and dQ tiles (None: the same).
PLAN_TILES = [(16, 16, None, None), (16, 32, 32, 16), (32, 16, 16, 64)]


@pytest.mark.parametrize("tiles", PLAN_TILES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_plan_covers_every_visible_pair_once(case, tiles):
  problem = dataclasses.replace(problem_of(case), has_segments=False)
  bplan = plan_lib.make_backward_plan(problem, *tiles)
  plan = bplan.plan
  bq, bk = bplan.block_q, bplan.block_k
  # One padded layout for both kernels, aligned to the larger tiles.
  kv_plan = plan_lib.make_plan(problem, tiles[0], tiles[1], max(bq, plan.block_q),
                               max(bk, plan.block_k))
  assert (kv_plan.tq_pad, kv_plan.tk_pad) == (plan.tq_pad, plan.tk_pad)
  assert (kv_plan.src_rows == plan.src_rows).all() and (kv_plan.valid_rows == plan.valid_rows).all()
  assert plan.tq_pad % max(bq, plan.block_q) == 0 and plan.tk_pad % max(bk, plan.block_k) == 0
  # Visibility on the padded layout (padding rows: invisible everywhere).
  mask = np.asarray(visible_mask(problem))[0, 0][plan.src_rows] & plan.valid_rows[:, None]
  mask = np.pad(mask, ((0, 0), (0, plan.tk_pad - problem.tk)))
  covered = np.zeros_like(mask, np.int32)
  kt, ents = bplan.kv_table, bplan.entries
  assert sorted(kt[:, plan_lib.KV_BLOCK].tolist()) == list(range(plan.tk_pad // bk))
  n = kt[:, plan_lib.KV_N_ENTRIES]
  assert (np.diff(n) <= 0).all(), "kv blocks not heavy-first"
  # With a window a kv block may have no entries at all.
  for j, start, n_full, count in kt:
    for e in range(start, start + count):
      row0, qpos0, kv_len, masked = ents[e, :4]
      assert masked == (e >= start + n_full)
      w = kv_plan.table[ents[e, plan_lib.E_WORK]]
      assert (w[plan_lib.ROW0], w[plan_lib.QPOS0], w[plan_lib.KV_LEN]) == (row0, qpos0, kv_len)
      tile = mask[row0:row0 + bq, j * bk:(j + 1) * bk]
      if not masked:   # every valid row sees every key of the tile
        assert tile[:w[plan_lib.N_ROWS]].all()
      covered[row0:row0 + bq, j * bk:(j + 1) * bk] += 1
  assert (covered[mask] == 1).all(), "dK/dV: a visible pair is missed or visited twice"
  assert bplan.n_entries == int(n.sum())
  # The dQ table (its own tiles) reaches every visible pair exactly once.
  covered = np.zeros_like(mask, np.int32)
  for row in plan.table:
    r0, first, nb = row[plan_lib.ROW0], row[plan_lib.FIRST], row[plan_lib.N_BLOCKS]
    covered[r0:r0 + plan.block_q, first * plan.block_k:nb * plan.block_k] += 1
  assert (covered[mask] == 1).all(), "dQ: a visible pair is missed or visited twice"


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_plan_turns_follow_the_table_order(case, ordered):
  # The fused backward's ordered dQ adds (plan.E_TURN): per q block, the kv
  # blocks that see it take turns 0..n-1 once each, in kv-table (launch)
  # order, so a CTA only ever waits on CTAs launched before it.
  problem = dataclasses.replace(problem_of(case), has_segments=False)
  bplan = plan_lib.make_backward_plan(problem, 16, 32, ordered=ordered)
  kt, ents = bplan.kv_table, bplan.entries
  n = kt[:, plan_lib.KV_N_ENTRIES]
  assert (np.diff(n) >= 0 if ordered else np.diff(n) <= 0).all()
  seen = {}   # q block row0 -> turns in table order
  for t, (_, start, n_full, count) in enumerate(kt):
    masked = ents[start:start + count, plan_lib.E_MASKED]
    # The kernel walks masked entries first when ordered, unmasked first otherwise.
    split = count - n_full if ordered else n_full
    assert (masked[:split] == int(ordered)).all() and (masked[split:] == int(not ordered)).all()
    for e in range(start, start + count):
      seen.setdefault(int(ents[e, plan_lib.E_ROW0]), []).append(
          (int(ents[e, plan_lib.E_TURN]), int(ents[e, plan_lib.E_NTURNS])))
  for row0, turns in seen.items():
    assert [tn[0] for tn in turns] == list(range(len(turns))), row0
    assert {tn[1] for tn in turns} == {len(turns)}, row0
  g = case.groups[0]
  if (ordered and case.causal and len(case.groups) == 1 and case.window is None
      and g.q_pos == 0 and g.kv_len == g.q_len):
    # Causal self-attention: a q block's first turn is its diagonal kv block,
    # which visits it first.
    for _, start, n_full, count in kt:
      if count:
        assert ents[start, plan_lib.E_TURN] == 0


# -------------------------------------------------------------- gradients --

@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_match_reference(case, backend):
  """Random out and lse cotangents; rows that see no key (lse = -inf: empty kv
  prefix, segment id no key has) must get exactly zero dq, and no NaN anywhere."""
  seed = seed_of(case.name)
  dq, _, _ = check_grads(case, backend, seed=seed)
  _, _, _, qs, ks = make_inputs(case, seed)
  blind = ~np.asarray(visible_mask(problem_of(case), qs, ks)).any(-1)[:, 0]   # [B or 1, Tq]
  blind = np.broadcast_to(blind, dq.shape[:2])
  if case.name in ("four_groups_kv0", "segments_causal"):
    assert blind.any(), "case lost its fully masked rows"
  assert (np.asarray(dq, np.float32)[blind] == 0).all()


SPLIT_TILES = [ga.BackwardConfig(16, 32, dq_block_q=32, dq_block_k=16),
               ga.BackwardConfig(32, 16, dq_block_q=16, dq_block_k=64, dq_num_warps=2)]


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", ["zigzag_r2w4c13", "three_groups_neg_pos", "segments_causal",
                                  "four_groups_kv0"])
@pytest.mark.parametrize("tiles", range(len(SPLIT_TILES)))
def test_grads_with_separate_dq_tiles(case, backend, tiles):
  # dK/dV and dQ on different tiles share one padded layout (plan.py).
  if registry.get(backend).backward_config_class is not ga.BackwardConfig:
    pytest.skip(f"{backend} has no Triton-style split dQ tiles")
  config = ga.AttentionConfig(forward=ga.ForwardConfig(16, 16), backward=SPLIT_TILES[tiles])
  case = case_by_name(case)
  check_grads(case, backend, seed=seed_of(case.name) + 7, config=config)


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_lse_cotangent_only(backend):
  case = case_by_name("three_groups_neg_pos")
  q, k, v, _, _ = make_inputs(case, 5)
  w = jnp.asarray(np.random.default_rng(6).standard_normal((case.batch, case.hq, case.tq)),
                  jnp.float32)

  def loss(fn):
    def f(q, k, v):
      _, lse = fn(q, k, v)
      return jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse) * w)
    return f

  got = jax.jit(jax.grad(loss(_attn(case, backend)), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(_attn(case, "xla", config=None)), argnums=(0, 1, 2))(q, k, v)
  _assert_grads_close(case.name, got, want)


def test_reference_check_grads_numerically():
  case = ga.QueryGroup
  groups = (case(0, 6, 3, 9), case(6, 5, -2, 7))
  problem_case = dataclasses.replace(case_by_name("one_group_odd"), groups=groups, tk=9,
                                     hq=2, hk=1, d=32, batch=1)
  q, k, v, _, _ = make_inputs(problem_case, 7)

  def f(q, k, v):
    out, lse = _attn(problem_case, "xla", config=None)(q, k, v)
    return out, jnp.where(jnp.isinf(lse), 0.0, lse)

  jax_check_grads(f, (q, k, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------ transforms --

def _loss_of(fn):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))) + 0.1 * jnp.sum(
        jnp.where(jnp.isinf(lse), 0.0, lse))
  return loss


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_transforms_jit_grad_value_and_grad_checkpoint(backend):
  case = case_by_name("two_groups_gap_pos")
  q, k, v, _, _ = make_inputs(case, 8)
  kernel, ref = _loss_of(_attn(case, backend)), _loss_of(_attn(case, "xla", config=None))
  want_val, want = jax.value_and_grad(ref, argnums=(0, 1, 2))(q, k, v)
  val, got = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(float(val), float(want_val), rtol=1e-5)
  _assert_grads_close(case.name, got, want)
  got = jax.jit(jax.grad(jax.checkpoint(kernel), argnums=(0, 1, 2)))(q, k, v)
  _assert_grads_close(case.name, got, want)


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_two_layer_scan(backend):
  case = case_by_name("zigzag_r0w2c16")   # Tq = Tk, Hq = 2 Hk
  q, k, v, _, _ = make_inputs(case, 9)
  ks = jnp.stack([k, k[:, ::-1] * 0.5])   # two layers' k, v: [2, B, Tk, Hk, D]
  vs = jnp.stack([v, jnp.cos(v)])

  def model(fn):
    def loss(q, ks, vs):
      def layer(x, kv):
        out, _ = fn(x, *kv)
        return jnp.tanh(out) + x, None
      x, _ = jax.lax.scan(layer, q, (ks, vs))
      return jnp.sum(x ** 2)
    return loss

  got = jax.jit(jax.grad(model(_attn(case, backend)), argnums=(0, 1, 2)))(q, ks, vs)
  want = jax.grad(model(_attn(case, "xla", config=None)), argnums=(0, 1, 2))(q, ks, vs)
  _assert_grads_close(case.name, got, want)


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_backward_reference_switch_gives_same_gradients(backend):
  case = case_by_name("segments_noncausal_groups")
  q, k, v, qs, ks = make_inputs(case, 10)
  grad = lambda mode: jax.jit(jax.grad(_loss_of(_attn(case, backend, qs, ks, backward=mode)),
                                       argnums=(0, 1, 2)))(q, k, v)
  _assert_grads_close(case.name, grad("kernel"), grad("reference"))


def test_no_quadratic_residuals():
  # Tq != Tk so an O(Tq * Tk) residual is recognisable by its shape.
  groups = (ga.QueryGroup(0, 48, 16, 80),)
  case = dataclasses.replace(case_by_name("one_group_odd"), groups=groups, tk=80, d=32)
  q, k, v, _, _ = make_inputs(case, 11)

  def residuals(backend):
    _, vjp_fn = jax.vjp(_attn(case, backend), q, k, v)
    return [x.shape for x in jax.tree_util.tree_leaves(vjp_fn) if hasattr(x, "shape")]

  quadratic = lambda s: case.tq in s and case.tk in s
  ref = residuals("xla")
  assert any(quadratic(s) for s in ref), f"test would not catch it: {ref}"
  for backend in BACKWARD_BACKENDS:
    shapes = residuals(backend)
    assert shapes and not any(quadratic(s) for s in shapes), shapes
    assert max(int(np.prod(s)) for s in shapes) <= q.size, shapes


# GQA, segments, padded q layout; GQA and a sliding window.
@pytest.mark.parametrize("name", ["segments_zigzag_bf16", "window_zigzag_gqa4"])
def test_pallas_backward_lowers_for_cuda_on_any_machine(name):
  case = case_by_name(name)
  q, k, v, qs, ks = make_inputs(case)
  problem = problem_of(case)

  def loss(q, k, v):
    out, lse = autodiff.differentiable(problem, Kernels.both("pallas_triton"), q, k, v, qs, ks)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=("cuda",)).as_text()
  names = re.findall(r'name = "(grouped_attention_\w+)"', text)
  assert sorted(n for n in names if "_bwd" in n) == sorted(BWD_KERNELS), names


# -------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_on_gpu_default_tiles(case, backend):
  check_grads(case, backend, seed=seed_of(case.name) + 1, config=None)

