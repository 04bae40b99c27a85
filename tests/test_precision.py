"""Precision and scale: what the interpreters cannot show.

* Long problems (T >= 512 interpreted; T >= 8192 and > 2^31 elements on the
  GPU), where a lossy accumulator or a 32-bit offset shows.
* The dot precision the GPU would run, read from the sm_90 compile output
  (Triton: PTX) and from the Pallas lowering (the Triton module it embeds):
  fp32 inputs must get IEEE fp32 dots, never tf32. The interpreters compute
  every dot in fp32 whatever the kernel asks, so no numeric test can see it.
* The calibration itself (jax_grouped_attn/testing.py): real kernels pass with margin, a
  kernel returning zeros or carrying a lossy accumulator does not.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import (
  CASES,
  KERNEL_BACKENDS,
  Case,
  assert_matches,
  case_by_name,
  check_forward,
  check_grads,
  lowp_grads,
  lowp_reference,
  make_inputs,
  problem_of,
  reference,
  seed_of,
)
from jax_grouped_attn import QueryGroup, autodiff, testing as tolerance
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig, MosaicForwardConfig
from jax_grouped_attn.reference import reference_backward

# ------------------------------------------------------------ long, on CPU --

# Interpreted: bf16, GQA 2, two zigzag groups (rank 1 of 2: Tq = 512 rows at
# positions 256-767 against Tk = 1024 keys). dK/dV on 16-row q tiles, so each
# kv block sums 64 q-block steps (32 per head): a lossy dK/dV accumulator
# adds up where T <= 128 hid it. ~1 min per backend and pass on 2 cores.
LONG = Case("long_zigzag_bf16", ga.zigzag_groups(1, 2, 256), 1024, hq=4, hk=2, d=64, batch=1,
            dtype=jnp.bfloat16)
LONG_CONFIG = ga.AttentionConfig(
    forward=(ga.ForwardConfig(64, 64), MosaicForwardConfig(block_q=64, block_kv=64, compute_wgs=1)),
    backward=(ga.BackwardConfig(16, 64, dq_block_q=64, dq_block_k=64),
              MosaicBackwardConfig(compute_wgs=1)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_forward_interpreted(backend):
  assert LONG.tq >= 512 and len(LONG.groups) == 2 and LONG.hq > LONG.hk
  check_forward(LONG, backend, seed=seed_of(LONG.name), config=LONG_CONFIG)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_grads_interpreted(backend):
  check_grads(LONG, backend, seed=seed_of(LONG.name), config=LONG_CONFIG)


# ------------------------------------------- dot precision, sm_90 (Triton) --

@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
def test_triton_fp32_dots_are_ieee_in_sm90_ptx(kernel):
  # fp32 IEEE dots have no tensor-core instruction on sm_90: FMA only. tf32
  # would show as wgmma/mma ...tf32. The bf16 compile shows the check sees dots.
  from devtools import compile_check as cc
  compiled, _, _ = cc.compile_kernel(kernel, 64, "float32", True)
  ptx = compiled.asm["ptx"]
  assert "tf32" not in ptx, re.findall(r"\S*tf32\S*", ptx)[:3]
  assert not re.search(r"\b(w?gmma|mma)\.", ptx), "fp32 dots reached a tensor-core op"
  assert "fma.rn.f32" in ptx
  compiled, _, _ = cc.compile_kernel(kernel, 64, "bfloat16", True)
  assert re.search(r"\bw?g?mma[\w.]*\.bf16", compiled.asm["ptx"]), "bf16 dots not on tensor cores"


def _pallas_triton_modules(dtype, monkeypatch):
  """The Triton modules (asm) that the Pallas launchers lower to for CUDA, for
  the forward and the three backward kernels at ``dtype``."""
  from jax._src.pallas.triton import lowering
  modules = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
  case = case_by_name("zigzag_r0w2c16")
  q, k, v, _, _ = make_inputs(case)
  problem = problem_of(case)

  def loss(q, k, v):
    out, lse = autodiff.differentiable(problem, Kernels.both("pallas_triton"), q, k, v, None, None)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  args = [x.astype(dtype) for x in (q, k, v)]
  jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
  return modules


def test_pallas_fp32_dots_carry_ieee_precision(monkeypatch):
  dots = lambda mods: [l for m in mods for l in m.splitlines() if "tt.dot" in l]
  f32 = dots(_pallas_triton_modules(jnp.float32, monkeypatch))
  # forward 2 dots, dK/dV 4 (full and masked loop bodies), dQ 3 (each twice).
  assert len(f32) >= 9, f32
  # The printer omits the default (IEEE) and shows any other precision.
  assert all("xf32>" in l and "tf32" not in l and "inputPrecision" not in l for l in f32), [
      l.strip() for l in f32 if "inputPrecision" in l or "tf32" in l][:3]
  bf16 = dots(_pallas_triton_modules(jnp.bfloat16, monkeypatch))
  assert bf16 and all("xbf16>" in l for l in bf16)
  assert all("inputPrecision = tf32" in l for l in bf16), "the check could not see a precision"


def test_launchers_choose_ieee_for_fp32_only():
  from jax_grouped_attn.pallas import launch as pallas_launch
  from jax_grouped_attn.triton import common as triton_launch
  assert triton_launch.input_precision(jnp.float32) == "ieee"
  assert pallas_launch.lax_precision(jnp.float32) == jax.lax.Precision.HIGHEST
  for dt in (jnp.bfloat16, jnp.float16):
    assert pallas_launch.lax_precision(dt) is None


# ------------------------------------------------------------ calibration --

# The interpreter's fp32 -> bf16 rounding is runtime.py's (tests/test_interpreter_rounding.py).


def test_tolerance_helper_basics():
  rng = np.random.default_rng(0)
  want = rng.standard_normal((64, 32)).astype(np.float32)
  lowp = want + 1e-3 * rng.standard_normal(want.shape).astype(np.float32)
  assert tolerance.check(lowp, want, lowp, dtype=jnp.bfloat16).ok
  c = tolerance.check(want + 5e-3 * rng.standard_normal(want.shape), want, lowp,
                      dtype=jnp.bfloat16)
  assert not c.ok and c.ratio > 1
  one = want.copy()
  one[3, 4] += 0.05     # a single wrong element
  assert not tolerance.check(one, want, lowp, dtype=jnp.bfloat16).ok
  nan = want.copy()
  nan[0, 0] = np.nan
  assert "NaN" in tolerance.check(nan, want, lowp).why
  inf = want.copy()
  inf[1, 1] = -np.inf
  assert "infinities" in tolerance.check(want, inf, inf).why
  assert tolerance.check(inf, inf, inf).ok
  with pytest.raises(AssertionError, match="ratio"):
    tolerance.assert_calibrated("x", np.zeros_like(want), want, lowp, dtype=jnp.bfloat16)


LOWP_CASES = [c for c in CASES if c.dtype != jnp.float32] + [LONG]


@pytest.mark.parametrize("case", LOWP_CASES, ids=str)
def test_calibration_rejects_zeros_and_larger_errors(case):
  # Without running a kernel: on every 16-bit case the tolerance accepts the
  # low-precision reference with margin, and rejects zeros (the old fixed
  # tolerances passed 50-79% of the gradient elements of a kernel returning
  # zeros) and an error 5x the low-precision reference's.
  seed = seed_of(case.name)
  q, k, v, qs, ks = make_inputs(case, seed)
  rng = np.random.default_rng(seed + 1)
  dout = jnp.asarray(rng.standard_normal(q.shape), case.dtype)
  dlse = jnp.asarray(rng.standard_normal((case.batch, case.hq, case.tq)), jnp.float32)
  ref_out, ref_lse = reference(case, q, k, v, qs, ks)
  lp_out, lp_lse = lowp_reference(case, q, k, v, qs, ks)
  f32 = lambda x: x.astype(jnp.float32)
  want = reference_backward(problem_of(case), f32(q), f32(k), f32(v), qs, ks, ref_out, ref_lse,
                            f32(dout), dlse)
  lowp = lowp_grads(case, q, k, v, qs, ks, dout, dlse)
  for name, w, lp in [("out", ref_out, lp_out)] + list(zip(("dq", "dk", "dv"), want, lowp)):
    c = tolerance.check(lp, w, lp, name=name, dtype=case.dtype)
    assert c.ok and c.ratio < 0.75, str(c)
    zero = tolerance.check(jnp.zeros_like(lp), w, lp, name=name, dtype=case.dtype)
    assert not zero.ok and zero.ratio > 20, str(zero)
    worse = f32(w) + 5 * (f32(lp) - f32(w))
    c = tolerance.check(worse, w, lp, name=name, dtype=case.dtype)
    assert not c.ok, str(c)
  assert tolerance.check(lp_lse, ref_lse, lp_lse).ok


# -------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.big
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_long_8192_fwd_bwd(backend):
  # Zigzag rank 1 of 2 at T = 16384: 8192 local rows (two groups) against
  # 16384 keys, bf16, GQA 4, default (tuned) tiles, vs the fp32 reference.
  # Reference memory: a few [1, 4, 8192, 16384] fp32 tensors (2 GiB each).
  case = Case("gpu_long_8192", ga.zigzag_groups(1, 2, 4096), 16384, hq=4, hk=1, d=128,
              batch=1, dtype=jnp.bfloat16)
  assert case.tq >= 8192
  check_forward(case, backend, seed=seed_of(case.name), config=None)
  check_grads(case, backend, seed=seed_of(case.name), config=None)


def _rows_reference(case, q, k, v, rows, heads):
  """fp32 and low-precision out of ``rows`` (global row ids, in one group) and
  q ``heads`` against the full k, v: a small problem of its own."""
  pos, kv_len = ga.groups.row_positions(case.groups, case.tq)
  assert len(set(kv_len[rows])) == 1 and (np.diff(pos[rows]) == 1).all()
  g = case.hq // case.hk
  sub = Case("rows", (QueryGroup(0, len(rows), int(pos[rows[0]]), int(kv_len[rows[0]])),),
             case.tk, hq=len(heads), hk=1, d=case.d, batch=1, dtype=case.dtype)
  assert len({h // g for h in heads}) == 1
  hk = heads[0] // g
  qs = q[:1, rows][:, :, heads]
  ks, vs = k[:1, :, hk:hk + 1], v[:1, :, hk:hk + 1]
  return reference(sub, qs, ks, vs, None, None), lowp_reference(sub, qs, ks, vs, None, None)


def _sliced_forward_check(backend, *, t, h, d, tail, prefix, middle, config=None):
  """Forward of q, k, v [1, t, h, d] bf16 where rows see a ``prefix``-key
  prefix except the last ``tail`` rows, which see every key; checked on three
  slices of rows (first, around ``middle``, last) and two heads against
  references of just those rows."""
  groups = (QueryGroup(0, t - tail, 0, prefix), QueryGroup(t - tail, tail, t - tail, t))
  case = Case("sliced", groups, t, hq=h, hk=h, d=d, batch=1, dtype=jnp.bfloat16)
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed_of(f"{t}x{h}x{d}")), 3)
  shape = (1, t, h, d)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  out, lse = jax.jit(lambda q, k, v: ga.grouped_attention(
      q, k, v, groups, backend=backend, return_lse=True, config=config))(q, k, v)
  assert out.shape == shape and out.dtype == jnp.bfloat16
  for rows in (np.arange(0, 128), np.arange(middle - 64, middle + 64), np.arange(t - 128, t)):
    for head in (0, h - 1):
      (ref, ref_lse), (lp, lp_lse) = _rows_reference(case, q, k, v, rows, [head])
      got = out[:1, rows][:, :, [head]]
      assert_matches(case.name, got, ref, lp, what=f" out rows {rows[0]}.. head {head}")
      assert_matches(case.name, lse[:1, [head]][:, :, rows], ref_lse, lp_lse,
                     what=f" lse rows {rows[0]}.. head {head}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sliced_forward_check_small(backend):
  # The code of the > 2^31-element GPU test, at a CPU size.
  _sliced_forward_check(backend, t=512, h=2, d=32, tail=128, prefix=64, middle=256,
                        config=ga.ForwardConfig(64, 64))


@pytest.mark.gpu
@pytest.mark.big
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_more_than_2_31_elements(backend):
  # q, out, k, v each hold 1 * 139264 * 64 * 256 = 2.28e9 > 2^31 elements
  # (4.6 GB in bf16): row * (H * D) offsets pass 2^31 from row 131072 on.
  # Cheap: most rows see a 2048-key prefix; the last 512 rows see every key
  # (they read k, v beyond 2^31 elements). Forward only; checked on slices of
  # rows (first, around 2^31, last) against references of just those rows.
  t, h, d = 139264, 64, 256
  assert t * h * d > 2 ** 31
  _sliced_forward_check(backend, t=t, h=h, d=d, tail=512, prefix=2048,
                        middle=2 ** 31 // (h * d))
