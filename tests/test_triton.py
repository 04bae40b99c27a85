"""Triton forward specifics: agreement with Pallas, the interpreter runner, errors.

The shared case matrix (test_forward.py) already runs backend="triton"
against the reference; these tests cover what is particular to Triton.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import (
  SMALL,
  Case,
  assert_close,
  assert_matches,
  case_by_name,
  check_forward,
  check_grads,
  make_inputs,
  problem_of,
  reference,
)
from jax_grouped_attn import QueryGroup, autodiff, plan as plan_lib
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.triton import kernels, launch, runtime
from jax_grouped_attn.triton.backend import TRITON

AGREE_CASES = ["zigzag_r0w2c16", "segments_zigzag_bf16", "gqa4_noncausal_groups"]
# Same math and tile order in both kernels: fp32 agrees to rounding; 16-bit
# outputs may differ by an ulp or two of the output dtype (on the GPU, with
# other tiles). Kernel vs reference checks are the calibrated ones (cases.py).
AGREE_TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2), jnp.float16: (4e-3, 4e-3)}


def _run(case, backend, q, k, v, qs, ks, config=SMALL, **kw):
  return ga.grouped_attention(q, k, v, case.groups, causal=case.causal, q_segment_ids=qs,
                              kv_segment_ids=ks, backend=backend, return_lse=True,
                              config=config, **kw)


@pytest.mark.parametrize("name", AGREE_CASES)
def test_triton_agrees_with_pallas(name):
  case = case_by_name(name)
  args = make_inputs(case, seed=11)
  t_out, t_lse = jax.jit(lambda *a: _run(case, "triton", *a))(*args)
  p_out, p_lse = jax.jit(lambda *a: _run(case, "pallas", *a))(*args)
  assert t_out.dtype == p_out.dtype == case.dtype
  assert_close(name, t_out, p_out, AGREE_TOL[case.dtype], what=" out vs pallas")
  assert_close(name, t_lse, p_lse, (1e-5, 1e-5), what=" lse vs pallas")


def test_interpreter_runs_under_jit_as_one_callback():
  case = case_by_name("two_groups_gap_pos")
  q, k, v, qs, ks = make_inputs(case, seed=5)
  fn = jax.jit(lambda q, k, v: _run(case, "triton", q, k, v, None, None))
  text = str(jax.make_jaxpr(fn)(q, k, v))
  assert text.count("pure_callback") == 1, text
  out1, _ = fn(q, k, v)
  out2, _ = fn(2 * q, k, v)   # same compiled function, fresh host buffers
  ref1, _ = reference(case, q, k, v, None, None)
  ref2, _ = reference(case, 2 * q, k, v, None, None)
  assert_matches(case.name, out1, ref1)
  assert_matches(case.name, out2, ref2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_run_interpreted_leaves_unwritten_rows_nan(dtype):
  # Launch only the first work-table row: its q block is exact, every other
  # output row stays NaN (the poison the runner allocates).
  case = case_by_name("one_group_odd")
  problem = problem_of(case)
  plan = plan_lib.make_plan(problem, 16, 16)
  q, k, v, _, _ = make_inputs(case, seed=3)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  qp, kp, vp, _, _ = TRITON._prepare(problem, plan, q, k, v, None, None)
  table = np.asarray(plan.table)
  first = table[:1]
  consts = launch.forward_constexprs(q_shape=qp.shape, kv_shape=kp.shape, problem=problem,
                                     plan=plan, dtype=dtype)
  out, lse = runtime.run_interpreted(
      kernels.forward_kernel, (1, case.batch * case.hq),
      [first, np.asarray(qp), np.asarray(kp), np.asarray(vp), first, first],
      [(qp.shape, qp.dtype), ((case.batch, case.hq, plan.tq_pad), np.float32)], **consts)
  assert out.dtype == np.dtype(qp.dtype)
  rows = np.arange(plan.tq_pad)
  written = (rows >= first[0, plan_lib.ROW0]) & (rows < first[0, plan_lib.ROW0] + plan.block_q)
  assert np.isnan(np.asarray(out, np.float32)[:, ~written]).all()
  assert np.isnan(lse[:, :, ~written]).all()
  full_out, full_lse = launch.forward(qp, kp, vp, None, None, problem=problem, plan=plan,
                                      config=SMALL.get("forward", ga.ForwardConfig), interpret=True)
  np.testing.assert_array_equal(np.asarray(out[:, written], np.float32),
                                np.asarray(full_out[:, written], np.float32))
  np.testing.assert_array_equal(lse[:, :, written], np.asarray(full_lse)[:, :, written])


def test_vmap_of_the_raw_launcher_runs_sequentially():
  # Without autodiff's batch folding, vmap reaches pure_callback itself
  # (vmap_method="sequential"): one interpreter run per vmapped element.
  case = case_by_name("zigzag_r0w2c16")
  problem = problem_of(case)
  plan = plan_lib.make_plan(problem, 16, 16)
  draws = [make_inputs(case, seed=s)[:3] for s in (1, 2)]
  padded = [TRITON._prepare(problem, plan, *d, None, None)[:3] for d in draws]
  stacked = [jnp.stack(xs) for xs in zip(*padded)]
  fwd = lambda q, k, v: launch.forward(q, k, v, None, None, problem=problem, plan=plan,
                                       config=SMALL.get("forward", ga.ForwardConfig),
                                       interpret=True)
  out, lse = jax.jit(jax.vmap(fwd))(*stacked)
  for i, p in enumerate(padded):
    o, l = fwd(*p)
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(o))
    np.testing.assert_array_equal(np.asarray(lse[i]), np.asarray(l))


def test_vmap_through_the_api_matches_per_example():
  case = case_by_name("gqa8_d32")
  draws = [make_inputs(case, seed=s)[:3] for s in (1, 2)]
  stacked = [jnp.stack(xs) for xs in zip(*draws)]
  f = lambda q, k, v: _run(case, "triton", q, k, v, None, None)[0]
  got = jax.jit(jax.vmap(f))(*stacked)
  for i, d in enumerate(draws):
    want, _ = reference(case, *d, None, None)
    assert_matches(case.name, got[i], want, what=f" vmap[{i}]")


# Left windows of 2-3 tiles (SMALL: 16 x 16): q blocks walk masked kv blocks,
# then unmasked ones, then masked ones again, from a FIRST > 0. The shared
# window cases (narrower windows) never reach the leading masked loop.
WIDE_WINDOW_CASES = [
    Case("window_wide_left_causal", (QueryGroup(0, 96, 0, 96),), 96, window=(40, 0)),
    Case("window_wide_both_groups_gqa",
         (QueryGroup(0, 50, 5, 90), QueryGroup(50, 46, 30, 70)), 96, causal=False, hq=4, hk=2,
         window=(37, 29), dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", WIDE_WINDOW_CASES, ids=lambda c: c.name)
def test_window_walk_with_leading_masked_blocks(case):
  table = plan_lib.make_plan(problem_of(case), 16, 16).table
  first, full0, n_full, n_blocks = (table[:, c] for c in (
      plan_lib.FIRST, plan_lib.FULL0, plan_lib.N_FULL, plan_lib.N_BLOCKS))
  # The case must exercise all three loops and pointers starting past block 0.
  assert ((first < full0) & (full0 < n_full) & (n_full < n_blocks)).any(), table
  assert (first > 0).any(), table
  check_forward(case, "triton", seed=7)
  check_grads(case, "triton", seed=7)


def test_interpreted_twin_is_separate_from_compiled_kernel():
  from triton.runtime.interpreter import InterpretedFunction
  from triton.runtime.jit import JITFunction
  twin = runtime.interpreted(kernels.forward_kernel)
  assert isinstance(twin, InterpretedFunction)
  assert isinstance(kernels.forward_kernel, JITFunction)      # GPU path untouched
  assert isinstance(kernels._attend_block, JITFunction)
  assert runtime.interpreted(kernels.forward_kernel) is twin  # built once
  import triton.language as tl
  assert isinstance(tl.standard.max, JITFunction)             # swap was undone


def test_interpreted_runs_leave_triton_language_as_they_found_it():
  # Triton's interpreter patches the builtins of each triton.language module a
  # called function sees and, for device functions (tl.max, tl.sum, ...), never
  # undoes it; a later compile in this process then fails with
  # "InterpreterBuilder" (seen with a fresh Triton cache). runtime restores them.
  import triton.language as tl
  owners = [tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.dtype]
  before = [dict(vars(o)) for o in owners]
  case = case_by_name("zigzag_r0w2c16")
  q, k, v, _, _ = make_inputs(case)
  loss = lambda q, k, v: jnp.sum(_run(case, "triton", q, k, v, None, None, interpret=True)[0])
  jax.block_until_ready(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
  for owner, members in zip(owners, before):
    now = vars(owner)
    changed = [n for n in members if n != "__annotations__" and now.get(n) is not members[n]]
    assert not changed, (owner, changed[:8])


def test_interpreted_rejects_non_kernels():
  with pytest.raises(TypeError, match="@triton.jit"):
    runtime.interpreted(lambda x: x)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU errors")
def test_compiled_triton_without_gpu_is_a_clear_error():
  case = case_by_name("zigzag_r0w2c16")
  q, k, v, _, _ = make_inputs(case)
  with pytest.raises(ValueError, match="needs a GPU"):
    _run(case, "triton", q, k, v, None, None, interpret=False)


def test_triton_call_output_keyword_is_detected(monkeypatch):
  # jax-triton names the outputs out_shape (0.3) or out_type (newer): the
  # dispatcher must pass whichever the installed version takes.
  seen = {}

  def new_style(*args, kernel, out_type, grid, name="", num_warps=None, num_stages=None,
                **meta):
    seen.update(out_type=out_type, grid=grid, name=name, num_warps=num_warps, meta=meta)
    return "launched"

  monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=new_style))
  runtime._triton_call_and_out_keyword.cache_clear()
  try:
    got = runtime.call(1, kernel=None, out_shape=["s"], grid=(2, 3), name="n", num_warps=8,
                       num_stages=2, interpret=False, BLOCK=16)
  finally:
    runtime._triton_call_and_out_keyword.cache_clear()
  assert got == "launched"
  assert seen == dict(out_type=["s"], grid=(2, 3), name="n", num_warps=8,
                      meta={"BLOCK": 16})


# ------------------------------------------------------------------- GPU ---

@pytest.mark.gpu
@pytest.mark.parametrize("name", AGREE_CASES + ["d256_f16", "d128_bf16_causal_long"])
def test_gpu_triton_agrees_with_pallas_default_tiles(name):
  case = case_by_name(name)
  args = make_inputs(case, seed=13)
  t_out, t_lse = jax.jit(lambda *a: _run(case, "triton", *a, config=None))(*args)
  p_out, p_lse = jax.jit(lambda *a: _run(case, "pallas", *a, config=None))(*args)
  assert_close(name, t_out, p_out, AGREE_TOL[case.dtype], what=" out vs pallas")
  assert_close(name, t_lse, p_lse, (1e-4, 1e-4), what=" lse vs pallas")


@pytest.mark.gpu
def test_gpu_launch_is_one_named_triton_call():
  case = case_by_name("segments_zigzag_bf16")
  q, k, v, qs, ks = make_inputs(case)
  problem = problem_of(case)
  f = lambda *a: autodiff.differentiable(problem, Kernels.both("triton"), *a)
  text = jax.jit(f).lower(q, k, v, qs, ks).as_text()
  assert text.count("triton_kernel_call") == 1, text


@pytest.mark.gpu
def test_gpu_interpret_true_still_works():
  check_forward(case_by_name("zigzag_r0w2c16"), "triton", interpret=True)
