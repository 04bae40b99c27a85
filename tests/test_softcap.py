"""Logit soft-capping (``logits_soft_cap=c``: scores s become c * tanh(s / c)).

The reference is checked against the formula written out here; every kernel
backend that supports the cap against the reference (forward, lse and the
gradients, calibrated tolerances); the others must refuse it by name.
Context-parallel strategies: tests/test_parallel.py (test_soft_cap_*).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import (
  KERNEL_BACKENDS,
  SMALL,
  SOFTCAP_CASES,
  Case,
  case_by_name,
  check_forward,
  check_grads,
  make_inputs,
  problem_of,
  reference,
)
from jax_grouped_attn import QueryGroup, registry, validate
from jax_grouped_attn.reference import reference_attention, reference_backward

make_attention_fn = pytest.importorskip("jax_grouped_attn.flax").make_attention_fn

NAMES = [c.name for c in SOFTCAP_CASES]


def _formula(q, k, v, c, mask):
  """Gemma 2's capped attention, written out: [B, T, H, D] inputs, fp32."""
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, precision="highest") / np.sqrt(q.shape[-1])
  s = jnp.where(mask, c * jnp.tanh(s / c), -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vr, precision="highest")


@pytest.mark.parametrize("window", [None, 5])
def test_reference_is_the_capped_formula(window):
  rng = np.random.default_rng(3)
  t = 24
  q, k, v = (jnp.asarray(rng.standard_normal((2, t, h, 16)) * 2, jnp.float32)
             for h in (4, 2, 2))
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = (j <= i) & ((i - j <= window) if window is not None else True)
  f = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla", logits_soft_cap=1.25,
                                   local_window_size=None if window is None else (window, 0))
  out, vjp = jax.vjp(f, q, k, v)
  want, vjp_want = jax.vjp(lambda q, k, v: _formula(q, k, v, 1.25, mask), q, k, v)
  do = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6)
  for got, exp in zip(vjp(do), vjp_want(do)):
    np.testing.assert_allclose(got, exp, atol=2e-5, rtol=2e-5)
  # The cap matters on these inputs (scores of a few units, cap 1.25).
  plain = ga.attention(q, k, v, causal=True, backend="xla",
                       local_window_size=None if window is None else (window, 0))
  assert float(jnp.max(jnp.abs(plain - out))) > 0.1


def test_explicit_backward_carries_the_cap():
  # reference_backward (the formula the ring uses) == autodiff of the reference.
  case = case_by_name("softcap_segments_noncausal")
  q, k, v, qs, ks = make_inputs(case, seed=4)
  problem = problem_of(case)
  rng = np.random.default_rng(5)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((case.batch, case.hq, case.tq)), jnp.float32)
  (out, lse), vjp = jax.vjp(lambda q, k, v: reference_attention(problem, q, k, v, qs, ks),
                            q, k, v)
  want = vjp((dout, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
  got = reference_backward(problem, q, k, v, qs, ks, out, lse, dout,
                           jnp.where(jnp.isfinite(lse), dlse, 0.0))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_soft_cap_forward(name, backend):
  case = case_by_name(name)
  out, lse = check_forward(case, backend, seed=11)
  assert np.isfinite(np.asarray(out, np.float32)).all()   # every row written


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_soft_cap_grads(name, backend):
  check_grads(case_by_name(name), backend, seed=12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_soft_cap_differs_from_no_cap_in_the_kernel(backend):
  # The kernel applies the cap (a kernel that ignored it would match the
  # uncapped reference instead).
  case = case_by_name("softcap_gqa_causal")
  if registry.get(backend).supports(problem_of(case), case.dtype):
    pytest.skip(f"{backend} has no soft cap")
  q, k, v, qs, ks = make_inputs(case, seed=13)
  got = ga.grouped_attention(q, k, v, case.groups, causal=True, backend=backend, config=SMALL,
                             logits_soft_cap=case.softcap)
  capped = reference(case, q, k, v, qs, ks)[0]
  plain = ga.grouped_attention(q, k, v, case.groups, causal=True, backend="xla")
  assert float(jnp.max(jnp.abs(got - capped))) < 1e-3 < float(jnp.max(jnp.abs(got - plain)))


@pytest.mark.parametrize("bad,error", [(0.0, ValueError), (-2.0, ValueError),
                                       (float("nan"), ValueError), (float("inf"), ValueError),
                                       ("50", TypeError), (True, TypeError)])
def test_bad_soft_caps_name_the_argument(bad, error):
  q = jnp.ones((1, 8, 2, 16), jnp.float32)
  with pytest.raises(error, match="logits_soft_cap"):
    ga.attention(q, q, q, causal=True, backend="xla", logits_soft_cap=bad)
  with pytest.raises(error, match="logits_soft_cap"):
    make_attention_fn(causal=True, logits_soft_cap=bad)


def test_traced_soft_cap_is_refused():
  q = jnp.ones((1, 8, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match="logits_soft_cap is a traced value"):
    jax.jit(lambda c: ga.attention(q, q, q, backend="xla", logits_soft_cap=c))(2.0)


def test_every_kernel_backend_has_the_cap():
  assert all(b.supports_softcap for b in registry.kernel_entries())


@pytest.mark.parametrize("head_dim,refused", [(128, False), (136, True), (256, True)])
def test_mosaic_refuses_the_cap_above_head_dim_128_by_name(head_dim, refused):
  # Its head_split=2 backward (head_dim > 128) has no room for 1 - tanh^2.
  q = jnp.ones((1, 16, 2, head_dim), jnp.bfloat16)
  problem = validate.make_problem(q, q, q, (QueryGroup(0, 16, 0, 16),), causal=True,
                                  softmax_scale=None, q_segment_ids=None,
                                  kv_segment_ids=None, logits_soft_cap=2.0)
  why = registry.get("pallas_mosaic").supports(problem, q.dtype)
  msg = (f"logits_soft_cap=2.0 with head_dim {head_dim} is not supported by "
         "backend='pallas_mosaic'")
  assert (why is not None and msg in why) if refused else why is None
  if refused and registry.get("pallas_mosaic").unavailable(jax.default_backend()) is None:
    with pytest.raises(ValueError, match=msg):
      ga.attention(q, q, q, causal=True, backend="pallas_mosaic", logits_soft_cap=2.0)


def test_auto_picks_a_backend_with_the_cap():
  case = case_by_name("softcap_gqa_causal")
  q, k, v, qs, ks = make_inputs(case, seed=14)
  got = ga.grouped_attention(q, k, v, case.groups, causal=True, logits_soft_cap=case.softcap)
  np.testing.assert_allclose(got, reference(case, q, k, v, qs, ks)[0], atol=1e-3, rtol=1e-3)


def test_dropin_and_flax_take_the_cap():
  rng = np.random.default_rng(15)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, h, 32)), jnp.float32) for h in (4, 2, 2))
  want = ga.attention(q, k, v, causal=True, backend="xla", logits_soft_cap=0.9)
  got = ga.dot_product_attention(q, k, v, is_causal=True, implementation="xla",
                                 logits_soft_cap=0.9)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  fn = make_attention_fn(causal=True, backend="xla", logits_soft_cap=0.9)
  np.testing.assert_allclose(fn(q, k, v), want, atol=1e-6, rtol=1e-6)
  plain = ga.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  assert float(jnp.max(jnp.abs(plain - want))) > 0.05


def test_rows_that_see_nothing_stay_zero_with_a_cap():
  q = jnp.asarray(np.random.default_rng(16).standard_normal((1, 8, 2, 16)), jnp.float32)
  groups = (QueryGroup(0, 4, 0, 0), QueryGroup(4, 4, 0, 8))
  for backend in ["xla"] + KERNEL_BACKENDS:
    if registry.get(backend).supports(
        validate.make_problem(q, q, q, groups, causal=True, softmax_scale=None,
                                 q_segment_ids=None, kv_segment_ids=None,
                                 logits_soft_cap=2.0), q.dtype):
      continue
    out, lse = ga.grouped_attention(q, q, q, groups, causal=True, backend=backend,
                                    return_lse=True, logits_soft_cap=2.0,
                                    **({} if backend == "xla" else {"config": SMALL}))
    assert (np.asarray(out[:, :4]) == 0).all() and np.isneginf(np.asarray(lse[..., :4])).all()
    assert np.isfinite(np.asarray(out[:, 4:])).all()


GPU_CASES = SOFTCAP_CASES + [
    Case("softcap_gemma_bf16", (QueryGroup(0, 1024, 0, 1024),), 1024, hq=8, hk=2, d=128,
         batch=1, dtype=jnp.bfloat16, softcap=50.0 / 8.0),
    Case("softcap_segments_groups_bf16",
         (QueryGroup(0, 192, 0, 192), QueryGroup(192, 64, 100, 256)), 256, hq=4, hk=2,
         d=128, batch=1, dtype=jnp.bfloat16, segments=True, softcap=4.0),
    Case("softcap_window_d256_f16", (QueryGroup(0, 512, 0, 512),), 512, hq=4, hk=4, d=256,
         batch=1, dtype=jnp.float16, window=(100, 0), softcap=2.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_soft_cap_on_gpu_default_tiles(case, backend):
  # Compiled kernels at their default tiles (skipped where a backend has no cap).
  check_forward(case, backend, seed=21, config=None)
  check_grads(case, backend, seed=22, config=None)
