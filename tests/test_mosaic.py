"""Mosaic GPU kernels (jax_grouped_attn.pallas.mosaic).

On CPU (CI): configs, errors, plans, and that the forward and backward
kernels trace and lower for CUDA. JAX 0.10's Mosaic GPU interpreter stops at
``run_state`` (the kernels accumulate in wgmma registers in place), so the
numeric checks run on a GPU only (``@pytest.mark.gpu``).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_grouped_attn import plan as plan_lib, validate
from jax_grouped_attn.backend import batch_folding
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.pallas.mosaic import config as mosaic_config, launch as ml
from jax_grouped_attn.pallas.mosaic.backend import PALLAS_MOSAIC
from jax_grouped_attn.pallas.mosaic.config import (
  MosaicBackwardConfig,
  MosaicForwardConfig,
  fits_forward,
  split_columns,
)
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_attention, reference_backward
from jax_grouped_attn.testing import assert_calibrated

# name, groups (q_start, q_len, q_pos, kv_len), tq, tk, hq, hk, d, causal, segments
# [, local_window_size]
CASES = [
    ("causal_gqa", [(0, 256, 0, 256)], 256, 256, 4, 2, 128, True, False),
    ("noncausal_odd_mqa", [(0, 133, 0, 120)], 133, 120, 2, 1, 64, False, False),
    ("groups_kv0_neg", [(0, 100, 300, 400), (100, 70, -30, 200), (170, 30, 0, 0)], 200, 400,
     2, 2, 128, True, False),
    ("segments", [(0, 192, 0, 192)], 192, 192, 2, 1, 128, True, True),
    ("d40_tiny", [(0, 10, 3, 7)], 10, 7, 2, 1, 40, True, False),
    ("d256", [(0, 128, 0, 128)], 128, 128, 2, 1, 256, True, False),
    ("d192", [(0, 200, 0, 200)], 200, 200, 2, 1, 192, True, False),
    ("d16_padded_in_launcher", [(0, 64, 0, 64)], 64, 64, 2, 2, 16, False, False),
    # Sliding windows. Forward CTAs of 128 rows x 128 keys: rows 512..639 of
    # left300 walk kv blocks 1-2 masked, 3 unmasked, 4 masked (FIRST=1).
    ("window_causal_left300", [(0, 768, 0, 768)], 768, 768, 4, 2, 128, True, False, (300, 0)),
    ("window_noncausal_both_mqa", [(0, 400, 0, 400)], 400, 400, 2, 1, 64, False, False,
     (90, 37)),
    ("window_right_only_groups", [(0, 150, -40, 300), (150, 90, 100, 180)], 240, 300, 2, 2,
     128, False, False, (None, 70)),
    ("window_segments", [(0, 384, 0, 384)], 384, 384, 2, 1, 128, True, True, (150, 0)),
    # Narrow window, far-apart groups: kv blocks between them have no dK/dV
    # entries, and the second group's blocks start late.
    ("window_sparse_kv_blocks", [(0, 64, 0, 700), (64, 64, 600, 700)], 128, 700, 2, 1, 64,
     False, False, (3, 17)),
]
IDS = [c[0] for c in CASES]
# The two compute warpgroups share a tile, each owning half of head_dim (D >= 128).
SPLIT = MosaicBackwardConfig(compute_wgs=2, head_split=2)
WIDE = [c for c in CASES if c[6] > 64]
# dQ inside the dK/dV kernel, TMA-added (q/k padded to 64 or 128).
FUSED = MosaicBackwardConfig(fused_dq=True)
ORDERED = MosaicBackwardConfig(fused_dq=True, ordered=True)   # and deterministic again
# S^T and dP^T in flight together (two kernels; fused, ordered).
BWD_OVERLAP = [MosaicBackwardConfig(overlap=True),
               MosaicBackwardConfig(fused_dq=True, ordered=True, overlap=True)]
BWD_OVERLAP_IDS = ["two_kernel", "ordered"]
NARROW = [c for c in CASES if c[6] <= 128]


def _problem(case):
  _, groups, tq, tk, hq, hk, d, causal, seg, *window = case
  return Problem(groups=tuple(QueryGroup(*g) for g in groups), batch=1, tq=tq, tk=tk, hq=hq,
                 hk=hk, head_dim=d, causal=causal, scale=1 / math.sqrt(d), has_segments=seg,
                 window=validate.check_window(window[0] if window else None, causal))


def _inputs(p, dtype=jnp.bfloat16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (p.batch, p.tq, p.hq, p.head_dim), dtype)
  k = jax.random.normal(ks[1], (p.batch, p.tk, p.hk, p.head_dim), dtype)
  v = jax.random.normal(ks[2], (p.batch, p.tk, p.hk, p.dv), dtype)
  qs = ksg = None
  if p.has_segments:
    qs = jnp.sort(jax.random.randint(ks[3], (p.batch, p.tq), 0, 3), axis=1).astype(jnp.int32)
    ksg = jnp.sort(jax.random.randint(ks[4], (p.batch, p.tk), 0, 3), axis=1).astype(jnp.int32)
  dout = jax.random.normal(ks[5], q.shape[:3] + (p.dv,), dtype)
  dlse = jax.random.normal(ks[6], (p.batch, p.hq, p.tq), jnp.float32)
  return q, k, v, qs, ksg, dout, dlse


def _fwd_bwd(p, fcfg=None, bcfg=None):
  """Original layouts in and out, through the registry entry (as autodiff calls it)."""
  fwd = lambda q, k, v, qs, ks: PALLAS_MOSAIC.forward(p, fcfg, False, q, k, v, qs, ks)
  bwd = lambda q, k, v, qs, ks, out, lse, dout, dlse: PALLAS_MOSAIC.backward(
      p, bcfg, False, q, k, v, qs, ks, out, lse, dout, dlse)
  return fwd, bwd


# ------------------------------------------------------------ configs, errors --

@pytest.mark.parametrize("field,value", [("block_q", 32), ("block_q", 128), ("block_kv", 96),
                                         ("max_concurrent_steps", 1), ("compute_wgs", 3),
                                         ("overlap", 1)])
def test_forward_config_rejects(field, value):
  with pytest.raises(ValueError, match=f"MosaicForwardConfig.{field}"):
    MosaicForwardConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("block_kv", 48), ("dq_block_kv", 256),
                                         ("compute_wgs", 0), ("head_split", 3),
                                         ("overlap", 1)])
def test_backward_config_rejects(field, value):
  with pytest.raises(ValueError, match=f"MosaicBackwardConfig.{field}"):
    MosaicBackwardConfig(**{field: value})


def test_backward_overlap_is_a_head_split_1_order():
  with pytest.raises(ValueError, match="overlap=True is a step order of the head_split=1"):
    MosaicBackwardConfig(head_split=2, overlap=True)


def test_head_split_needs_two_warpgroups_and_wide_heads():
  with pytest.raises(ValueError, match="head_split=2 .* needs compute_wgs=2"):
    MosaicBackwardConfig(compute_wgs=1, head_split=2)
  p = _problem(CASES[IDS.index("noncausal_odd_mqa")])   # D64: halves of 32 columns
  _, bwd = _fwd_bwd(p, None, SPLIT)
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  with pytest.raises(ValueError, match="head_split=2 needs q/k and v padded head_dims of at "
                                       "least 128"):
    _lower(bwd, q, k, v, qs, ks, q, jnp.zeros((1, p.hq, p.tq)), dout, dlse)


def test_head_split_plans_one_tile_per_cta():
  p = _problem(CASES[IDS.index("causal_gqa")])
  b = ml.backward_plan(p, SPLIT)
  assert (b.block_k, b.plan.block_q) == (SPLIT.block_kv, SPLIT.dq_block_q)
  assert SPLIT.kv_per_cta == 64 and MosaicBackwardConfig().kv_per_cta == 128


def test_configs_hashable():
  assert hash(MosaicForwardConfig()) == hash(MosaicForwardConfig())
  assert hash(MosaicBackwardConfig()) == hash(MosaicBackwardConfig())


def test_float32_is_refused():
  p = _problem(CASES[0])
  plan = ml.forward_plan(p)
  q = jnp.zeros((1, plan.tq_pad, p.hq, 128), jnp.float32)
  k = jnp.zeros((1, plan.tk_pad, p.hk, 128), jnp.float32)
  with pytest.raises(ValueError, match="bf16/f16; use backend='triton' for float32"):
    ml.forward(q, k, k, None, None, problem=p, plan=plan, config=None)


def test_padded_head_dim():
  # Multiples of 64 (the swizzle's width): MLA's 192 is not padded to 256.
  assert [ml.padded_head_dim(d) for d in (8, 64, 65, 128, 129, 192, 193, 256)] == [
      64, 64, 128, 128, 192, 192, 256, 256]
  with pytest.raises(ValueError, match="head_dim <= 256"):
    ml.padded_head_dim(512)


# ---------------------------------------------------------------------- plans --

def test_min_block_keeps_mosaic_tiles_and_default_unchanged():
  p = _problem(CASES[4])   # 10 rows, 7 keys
  assert plan_lib.effective_blocks(p, 128, 128) == (16, 16)
  assert plan_lib.effective_blocks(p, 128, 128, min_block=64) == (64, 64)
  fplan = ml.forward_plan(p)
  assert (fplan.block_q, fplan.block_k) == (64, 64)
  bplan = ml.backward_plan(p)
  assert bplan.block_q % 64 == 0 and bplan.block_k % 64 == 0
  assert bplan.plan.block_q % 64 == 0 and bplan.plan.block_k % 64 == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plans_fit_the_kernels(case):
  p = _problem(case)
  f = ml.forward_plan(p)
  assert f.block_q in (64, 128) and f.block_k in (64, 128)
  b = ml.backward_plan(p)
  cfg = ml.backward_config(p, None)
  assert b.block_k // cfg.block_kv in (1, cfg.compute_wgs)
  assert b.plan.block_q // cfg.dq_block_q in (1, cfg.compute_wgs)


def test_windows_are_supported_and_start_late():
  """The registry entry takes windows; the left-window case really walks
  all three ranges from a FIRST > 0 (what the kernels' _KvBlocks streams)."""
  p = _problem(CASES[IDS.index("window_causal_left300")])
  assert PALLAS_MOSAIC.supports(p, jnp.bfloat16) is None
  for plan in (ml.forward_plan(p), ml.backward_plan(p).plan):
    t = plan.table
    first, full0, n_full, n_blocks = (t[:, c] for c in (plan_lib.FIRST, plan_lib.FULL0,
                                                       plan_lib.N_FULL, plan_lib.N_BLOCKS))
    assert ((first <= full0) & (full0 <= n_full) & (n_full <= n_blocks)).all()
    assert ((first > 0) & (first < full0) & (full0 < n_full) & (n_full < n_blocks)).any()


@pytest.mark.parametrize("case", [c for c in CASES if len(c) > 9], ids=lambda c: c[0])
def test_window_plans_keep_the_ring_walk_contiguous(case):
  """What _KvBlocks relies on: FIRST <= FULL0 <= N_FULL <= N_BLOCKS, and
  without a left window FIRST = FULL0 = 0 (it then walks [0, N_BLOCKS))."""
  p = _problem(case)
  for plan in (ml.forward_plan(p), ml.backward_plan(p).plan):
    first, full0, n_full, n_blocks = (plan.table[:, c] for c in (
        plan_lib.FIRST, plan_lib.FULL0, plan_lib.N_FULL, plan_lib.N_BLOCKS))
    assert ((first <= full0) & (full0 <= n_full) & (n_full <= n_blocks)).all()
    if p.window_left < 0:
      assert (first == 0).all() and (full0 == 0).all()


# -------------------------------------------------------- lowering for CUDA --

def _lower(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# Every case in bf16; f16 shares the code path (one case keeps it honest).
LOWER = [(c, jnp.bfloat16) for c in CASES] + [(CASES[2], jnp.float16)]


@pytest.mark.parametrize("case,dtype", LOWER,
                         ids=[f"{c[0]}-{jnp.dtype(d).name}" for c, d in LOWER])
def test_forward_and_backward_lower_for_cuda(case, dtype):
  p = _problem(case)
  fwd, bwd = _fwd_bwd(p)
  q, k, v, qs, ks, dout, dlse = _inputs(p, dtype)
  text = _lower(fwd, q, k, v, qs, ks)
  assert "mosaic_gpu" in text
  out = jax.ShapeDtypeStruct(q.shape, dtype)
  lse = jax.ShapeDtypeStruct((p.batch, p.hq, p.tq), jnp.float32)
  text = _lower(bwd, q, k, v, qs, ks, out, lse, dout, dlse)
  assert text.count("mosaic_gpu") >= 2


def _overlapped(p):
  """The heuristic forward config of p, with intra-warpgroup overlap."""
  return dataclasses.replace(ml.forward_config(p, None), overlap=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_overlapped_forward_lowers_for_cuda(case):
  p = _problem(case)
  fwd, _ = _fwd_bwd(p, _overlapped(p))
  assert _lower(fwd, *_inputs(p)[:5]).count("custom_call @mosaic_gpu") == 1


TUNED_NEW = [(d, c) for d in (64, 128, 256) for pass_ in ("forward", "backward")
             for c in mosaic_config.tuning_candidates(pass_, d, "full")
             if c.overlap or getattr(c, "fused_dq", False)]


@pytest.mark.parametrize("d,cfg", TUNED_NEW, ids=[f"d{d}-{c}" for d, c in TUNED_NEW])
def test_overlap_and_fused_tuning_candidates_lower_for_cuda(d, cfg):
  # The tuner times these on a GPU: each must lower where it is offered.
  p = _problem(("c", [(0, 256, 0, 256)], 256, 256, 4, 2, d, True, False))
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  if isinstance(cfg, MosaicForwardConfig):
    assert _lower(_fwd_bwd(p, cfg)[0], q, k, v, qs, ks).count("custom_call @mosaic_gpu") == 1
  else:
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse = jax.ShapeDtypeStruct((p.batch, p.hq, p.tq), jnp.float32)
    text = _lower(_fwd_bwd(p, None, cfg)[1], q, k, v, qs, ks, out, lse, dout, dlse)
    assert text.count("custom_call @mosaic_gpu") == (1 if cfg.fused_dq else 2)


@pytest.mark.parametrize("case", NARROW, ids=[c[0] for c in NARROW])
@pytest.mark.parametrize("bcfg", BWD_OVERLAP, ids=BWD_OVERLAP_IDS)
def test_overlapped_backward_lowers_for_cuda(case, bcfg):
  assert _lower_backward(case, bcfg).count("custom_call @mosaic_gpu") == (
      1 if bcfg.fused_dq else 2)


@pytest.mark.parametrize("case", NARROW, ids=[c[0] for c in NARROW])
@pytest.mark.parametrize("bcfg", [FUSED, ORDERED], ids=["fused", "ordered"])
def test_fused_backward_lowers_for_cuda(case, bcfg):
  text = _lower_backward(case, bcfg)
  assert text.count("custom_call @mosaic_gpu") == 1   # one kernel: dQ inside dK/dV


@pytest.mark.parametrize("case", WIDE, ids=[c[0] for c in WIDE])
def test_head_split_backward_lowers_for_cuda(case):
  assert _lower_backward(case, SPLIT).count("mosaic_gpu") >= 2


def _lower_backward(case, bcfg):
  """The backward with config ``bcfg`` on ``case``, lowered for CUDA (text)."""
  p = _problem(case)
  _, bwd = _fwd_bwd(p, None, bcfg)
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  lse = jax.ShapeDtypeStruct((p.batch, p.hq, p.tq), jnp.float32)
  return _lower(bwd, q, k, v, qs, ks, out, lse, dout, dlse)


SOFTCAP_LOWER = ["causal_gqa", "noncausal_odd_mqa", "window_segments"]


@pytest.mark.parametrize("name", SOFTCAP_LOWER)
def test_soft_cap_lowers_for_cuda_and_reaches_every_kernel(name):
  base = _problem(CASES[IDS.index(name)])
  q, k, v, qs, ks, dout, dlse = _inputs(base)
  out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  lse = jax.ShapeDtypeStruct((base.batch, base.hq, base.tq), jnp.float32)
  tanhs = []
  for p in (base, dataclasses.replace(base, softcap=30.0)):
    fwd, bwd = _fwd_bwd(p)
    texts = (_lower(fwd, q, k, v, qs, ks), _lower(bwd, q, k, v, qs, ks, out, lse, dout, dlse))
    assert [t.count("mosaic_gpu") > 0 for t in texts] == [True, True]
    tanhs.append([t.count("tanh") for t in texts])
  # The forward, and both backward kernels (dK/dV, dQ), take the tanh; none without the cap.
  (f0, b0), (f1, b1) = tanhs
  assert f0 == b0 == 0 and f1 > 0 and b1 >= 2 * f1, tanhs


# (case, v's head_dim): MLA's 192/128 and the other width pairs the kernels
# size apart (O in Q's first column part, or a tile of its own when wider).
HEAD_DIM_V = [("causal_gqa", 64), ("noncausal_odd_mqa", 128), ("d256", 128), ("d192", 128),
              ("segments", 192), ("window_causal_left300", 64)]


def _with_dv(name, dv):
  return dataclasses.replace(_problem(CASES[IDS.index(name)]), head_dim_v=dv)


@pytest.mark.parametrize("name,dv", HEAD_DIM_V, ids=[f"{n}-dv{d}" for n, d in HEAD_DIM_V])
def test_a_value_head_dim_of_its_own_lowers_for_cuda(name, dv):
  p = _with_dv(name, dv)
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  fwd, bwd = _fwd_bwd(p)
  out = jax.eval_shape(fwd, q, k, v, qs, ks)[0]
  assert out.shape == q.shape[:3] + (dv,)
  assert "mosaic_gpu" in _lower(fwd, q, k, v, qs, ks)
  lse = jax.ShapeDtypeStruct((p.batch, p.hq, p.tq), jnp.float32)
  text = _lower(bwd, q, k, v, qs, ks, jax.ShapeDtypeStruct(out.shape, out.dtype), lse, dout,
                dlse)
  assert text.count("mosaic_gpu") >= 2


def test_tiles_are_sized_for_each_head_dim():
  # MLA 192/128: 128-key forward tiles fit beside 192-wide Q/K and 128-wide V
  # (not at 192/192), the backward splits both widths in 64-column parts.
  fwd = lambda dqk, dv: ml.forward_config(_with_dv("d192", dv) if dqk == 192 else
                                          _with_dv("causal_gqa", dv), None)
  assert fwd(192, 128).block_kv == 128 and fwd(192, 192).block_kv == 64
  assert fwd(128, 64).block_kv == 128
  assert ml.backward_config(_with_dv("d192", 128), None).head_split == 2
  assert ml.backward_config(_with_dv("causal_gqa", 64), None).head_split == 1
  assert split_columns(192, 128) == ((64, 128), (64, 64), 64)
  assert split_columns(256, 256) == ((128, 128), (128, 128), 128)
  # Both warpgroups get the same wgmma work: S (dqk) + parts = dP (dv) + parts.
  for dqk, dv in ((192, 128), (192, 192), (256, 128), (128, 256), (256, 256)):
    (a, _), (b, _), c = split_columns(dqk, dv)
    score, grad = dqk + a + b, dv + (dqk - a) + (dv - b)
    assert abs(score - grad) <= 64, (dqk, dv)
    # dQ: as even as parts of q/k's width allow (128/256: dQ's 64 | 64 vs dP's 256).
    assert abs((dqk + c) - (dv + dqk - c)) <= max(64, dv - dqk), (dqk, dv)
  for dqk, dv in ((192, 128), (128, 64), (64, 128), (256, 256)):
    assert fits_forward(ml.heuristics.forward_config(dqk, head_dim_v=dv), dqk, dv)


def test_head_split_refuses_the_soft_cap_by_name():
  p = dataclasses.replace(_problem(CASES[IDS.index("causal_gqa")]), softcap=30.0)
  _, bwd = _fwd_bwd(p, None, SPLIT)
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  with pytest.raises(ValueError, match="head_split=2 has no soft cap"):
    _lower(bwd, q, k, v, qs, ks, q, jnp.zeros((1, p.hq, p.tq)), dout, dlse)


def test_vmapped_launchers_lower():
  """backend.batch_folding (how the registry entry calls launchers) under jax.vmap."""
  p = _problem(CASES[0])
  plan, bplan = ml.forward_plan(p), ml.backward_plan(p)
  q = jnp.zeros((3, 1, plan.tq_pad, p.hq, 128), jnp.bfloat16)
  k = jnp.zeros((3, 1, plan.tk_pad, p.hk, 128), jnp.bfloat16)
  lse = jnp.zeros((3, 1, p.hq, plan.tq_pad), jnp.float32)
  fwd = batch_folding(ml.forward)
  bwd = batch_folding(ml.backward)
  _lower(jax.vmap(lambda q, k, v: fwd(q, k, v, None, None, problem=p, plan=plan, config=None,
                                      interpret=False)), q, k, k)
  _lower(jax.vmap(lambda q, k, v, o, l, do, dl: bwd(
      q, k, v, None, None, o, l, do, dl, problem=p, plan=bplan, config=None, interpret=False)),
      q, k, k, q, lse, q, lse)


def test_custom_configs_lower():
  p = _problem(CASES[0])
  fwd, bwd = _fwd_bwd(p, MosaicForwardConfig(block_kv=64, max_concurrent_steps=3, compute_wgs=1),
                      MosaicBackwardConfig(block_q=128, dq_block_kv=128, compute_wgs=1))
  q, k, v, qs, ks, dout, dlse = _inputs(p)
  _lower(fwd, q, k, v, qs, ks)
  _lower(bwd, q, k, v, qs, ks, q, jnp.zeros((1, p.hq, p.tq)), dout, dlse)


# ------------------------------------------------------------ GPU numerics --

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_on_gpu(case, dtype):
  _check_on_gpu(case, dtype, None)


@pytest.mark.gpu
@pytest.mark.parametrize("case", WIDE, ids=[c[0] for c in WIDE])
def test_head_split_matches_reference_on_gpu(case):
  _check_on_gpu(case, jnp.bfloat16, SPLIT)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_overlapped_forward_matches_reference_on_gpu(case):
  _check_on_gpu(case, jnp.bfloat16, None, fcfg=_overlapped)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SOFTCAP_LOWER)
def test_overlapped_forward_with_soft_cap_matches_reference_on_gpu(name):
  case = next(c for c in CASES if c[0] == name)
  _check_on_gpu(case, jnp.bfloat16, None, fcfg=_overlapped,
                problem=dataclasses.replace(_problem(case), softcap=30.0))


@pytest.mark.gpu
@pytest.mark.parametrize("case", NARROW, ids=[c[0] for c in NARROW])
@pytest.mark.parametrize("bcfg", BWD_OVERLAP, ids=BWD_OVERLAP_IDS)
def test_overlapped_backward_matches_reference_on_gpu(case, bcfg):
  _check_on_gpu(case, jnp.bfloat16, bcfg)


@pytest.mark.gpu
@pytest.mark.parametrize("case", NARROW, ids=[c[0] for c in NARROW])
@pytest.mark.parametrize("bcfg", [FUSED, ORDERED], ids=["fused", "ordered"])
def test_fused_backward_matches_reference_on_gpu(case, bcfg):
  _check_on_gpu(case, jnp.bfloat16, bcfg)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SOFTCAP_LOWER)
def test_fused_backward_with_soft_cap_matches_reference_on_gpu(name):
  case = next(c for c in CASES if c[0] == name)
  _check_on_gpu(case, jnp.bfloat16, FUSED,
                problem=dataclasses.replace(_problem(case), softcap=30.0))


@pytest.mark.gpu
@pytest.mark.parametrize("name,dv", HEAD_DIM_V, ids=[f"{n}-dv{d}" for n, d in HEAD_DIM_V])
def test_value_head_dim_matches_reference_on_gpu(name, dv):
  p = _with_dv(name, dv)
  _check_on_gpu(name, jnp.bfloat16, None, problem=p)
  if min(p.head_dim, dv) > 64:
    _check_on_gpu(name, jnp.bfloat16, SPLIT, problem=p)
  if max(p.head_dim, dv) <= 128:
    _check_on_gpu(name, jnp.bfloat16, FUSED, problem=p)


def _check_on_gpu(case, dtype, bcfg, problem=None, fcfg=None):
  name = case if isinstance(case, str) else case[0]
  p = problem or _problem(case)
  fcfg = fcfg(p) if callable(fcfg) else fcfg
  fwd, bwd = _fwd_bwd(p, fcfg, bcfg)
  q, k, v, qs, ks, dout, dlse = _inputs(p, dtype, seed=zlib.crc32(name.encode()) % 1000)
  out, lse = jax.jit(fwd)(q, k, v, qs, ks)
  # Calibrated (jax_grouped_attn/testing.py): the fp32 reference, and the same
  # attention in ``dtype`` whose error sets the budget.
  f32 = lambda x: x.astype(jnp.float32)
  ro, rl = reference_attention(p, f32(q), f32(k), f32(v), qs, ks)
  lo, ll = reference_attention(p, q, k, v, qs, ks, compute_dtype=dtype)
  name = f"mosaic {name} Dqk {p.head_dim} Dv {p.dv} {jnp.dtype(dtype).name} {fcfg} {bcfg}"
  assert_calibrated(name, out, ro, lo, what=" out")
  assert_calibrated(name, lse, rl, ll, what=" lse")
  # The backward on the same (rounded) out and lse for all three.
  ro16 = ro.astype(dtype)
  got = jax.jit(bwd)(q, k, v, qs, ks, ro16, rl, dout, dlse)
  want = reference_backward(p, f32(q), f32(k), f32(v), qs, ks, f32(ro16), rl, f32(dout), dlse)
  lowp = reference_backward(p, q, k, v, qs, ks, ro16, rl, dout, dlse, compute_dtype=dtype)
  for n, g, w, lp in zip(("dq", "dk", "dv"), got, want, lowp):
    assert_calibrated(name, g, w, lp, what=f" {n}")
  # Deterministic: a second run is bitwise equal (the fused backward: dK, dV).
  again = jax.jit(bwd)(q, k, v, qs, ks, ro16, rl, dout, dlse)
  fused = bcfg is not None and bcfg.fused_dq and not bcfg.ordered
  for g, h in list(zip(got, again))[1 if fused else 0:]:
    np.testing.assert_array_equal(np.asarray(g), np.asarray(h))


@pytest.mark.parametrize("deterministic", [True, False])
def test_registry_entry_lowers_with_grad_inside_check_vma_shard_map(deterministic):
  # The path a user takes (autodiff's custom_vjp around the entry) inside
  # shard_map with check_vma=True: the kernels' outputs carry vma types.
  # deterministic=False: the fused backward (one kernel, mutable Refs).
  from jax.sharding import PartitionSpec as P

  from jax_grouped_attn import autodiff
  from jax_grouped_attn.call import Kernels
  p = _problem(CASES[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("dp",))
  kernels = Kernels.both("pallas_mosaic", deterministic=deterministic)
  attn = lambda q, k, v: autodiff.differentiable(p, kernels, q, k, v, None, None)[0]
  f = jax.shard_map(attn, mesh=mesh, in_specs=(P("dp"),) * 3, out_specs=P("dp"),
                    check_vma=True)
  q, k, v = _inputs(dataclasses.replace(p, batch=2))[:3]
  grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  text = _lower(grad, q, k, v)
  assert text.count("custom_call @mosaic_gpu") == (3 if deterministic else 2)
