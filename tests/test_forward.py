"""Forward of every kernel backend vs the fp32 reference on the shared case matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import (
  CASES,
  KERNEL_BACKENDS,
  SMALL,
  assert_matches,
  case_by_name,
  check_forward,
  make_inputs,
  problem_of,
  seed_of,
)
from jax_grouped_attn import autodiff
from jax_grouped_attn.call import Kernels


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, backend):
  check_forward(case, backend, seed=seed_of(case.name))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_default_config_and_fresh_inputs(backend):
  # Default (large) tiles on a problem smaller than one tile, two different
  # random draws: a stale or unwritten row would match only one of them.
  case = case_by_name("two_groups_gap_pos")
  a, _ = check_forward(case, backend, seed=1, config=None)
  b, _ = check_forward(case, backend, seed=2, config=None)
  assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_wrapper_bottom_right_causal(backend):
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 20, 4, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 45, 2, 64)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 45, 2, 64)), jnp.float32)
  got = ga.attention(q, k, v, causal=True, backend=backend, config=SMALL)
  want = ga.attention(q, k, v, causal=True, backend="xla")
  assert_matches("bottom_right", got, want)
  # Last row sees every key: equal to non-causal attention of that row.
  full = ga.attention(q[:, -1:], k, v, causal=False, backend="xla")
  assert_matches("bottom_right last row", got[:, -1:], full)
  # ... and the first row sees keys 0..25 only: the mask matters.
  assert not np.allclose(np.asarray(got[:, :1]),
                         np.asarray(ga.attention(q[:, :1], k, v, causal=False, backend="xla")))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_rows_are_zero_with_minus_inf_lse(backend):
  case = case_by_name("four_groups_kv0")   # group 0 has kv_len = 0
  out, lse = check_forward(case, backend)
  assert (np.asarray(out[:, :5], np.float32) == 0).all()
  assert np.isneginf(np.asarray(lse[:, :, :5])).all()


@pytest.mark.parametrize("name", ["segments_zigzag_bf16", "window_zigzag_gqa4"])
def test_pallas_lowers_for_cuda_on_any_machine(name):
  case = case_by_name(name)
  q, k, v, qs, ks = make_inputs(case)
  problem = problem_of(case)
  f = lambda *a: autodiff.differentiable(problem, Kernels.both("pallas_triton"), *a)
  text = jax.jit(f).trace(q, k, v, qs, ks).lower(lowering_platforms=("cuda",)).as_text()
  assert "grouped_attention_fwd" in text


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_on_gpu_default_tiles(case, backend):
  check_forward(case, backend, seed=7, config=None)
