"""The one case matrix and comparison helpers shared by every backend's tests."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from jax_grouped_attn import QueryGroup, registry, validate
from jax_grouped_attn.groups import normalize_groups
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import (
  reference_attention,
  reference_backward,
  soft_cap,
  visible_mask,
)
from jax_grouped_attn.testing import assert_calibrated


def _kernel_backends() -> list[str]:
  """Registry kernel entries that run here (compiled on a GPU, else interpreted)."""
  gpu = jax.default_backend() == "gpu"
  return [b.name for b in registry.kernel_entries()
          if b.unavailable(jax.default_backend()) is None and (gpu or b.interpretable)]


# Kernel backends under test (the xla backend is the reference itself).
KERNEL_BACKENDS = _kernel_backends()



def _small() -> ga.AttentionConfig:
  """Each kernel family's smallest tiles (Backend.small_configs), one config
  per class, so the tiny test problems still span several q and kv blocks."""
  passes = ({}, {})
  for entry in registry.kernel_entries():
    for by_class, cfg in zip(passes, entry.small_configs()):
      if cfg is not None:
        by_class.setdefault(type(cfg), cfg)
  return ga.AttentionConfig(forward=tuple(passes[0].values()),
                            backward=tuple(passes[1].values()))


SMALL = _small()


def skip_unsupported(backend: str, case: "Case") -> None:
  """pytest.skip where ``backend`` cannot compute ``case`` (e.g. Mosaic and float32)."""
  if backend in registry.names() and backend not in registry.ALIASES and backend != "auto":
    why = registry.get(backend).supports(problem_of(case), case.dtype)
    if why is not None:
      pytest.skip(why)

# Kernel results are compared with the fp32 reference under calibrated
# tolerances (jax_grouped_attn/testing.py): at most twice the error of plain attention in the
# input dtype, plus a small floor.


def seed_of(name: str) -> int:
  """A stable seed per name (unlike hash(), the same in every process)."""
  return zlib.crc32(name.encode()) % 1000


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  groups: tuple
  tk: int
  hq: int = 4
  hk: int = 2
  d: int = 64
  batch: int = 2
  causal: bool = True
  segments: bool = False
  dtype: object = jnp.float32
  window: object = None      # local_window_size
  softcap: float | None = None   # logits_soft_cap

  @property
  def tq(self) -> int:
    return sum(g.q_len for g in self.groups)

  def __str__(self):
    return self.name


def _zz(rank, world, chunk, **kw):
  return Case(f"zigzag_r{rank}w{world}c{chunk}", ga.zigzag_groups(rank, world, chunk),
              2 * world * chunk, **kw)


CASES = [
    # zigzag layouts: several ranks and world sizes, aligned and odd chunks
    _zz(0, 2, 16),
    _zz(1, 2, 24, dtype=jnp.bfloat16),
    _zz(3, 4, 16, hq=8, hk=1),
    _zz(2, 4, 13),
    _zz(5, 8, 8, hq=2, hk=2, batch=1),
    # arbitrary groups (1-4), odd lengths, negative positions, empty kv prefix
    Case("one_group_odd", (QueryGroup(0, 37, 10, 47),), 53, d=80),
    Case("two_groups_gap_pos", (QueryGroup(0, 19, 40, 61), QueryGroup(19, 22, 3, 29)), 64),
    Case("three_groups_neg_pos", (QueryGroup(0, 9, -5, 30), QueryGroup(9, 30, 12, 50),
                                  QueryGroup(39, 7, 60, 70)), 70, hq=8, hk=2),
    Case("four_groups_kv0", (QueryGroup(0, 5, 0, 0), QueryGroup(5, 17, 20, 33),
                             QueryGroup(22, 11, 2, 64), QueryGroup(33, 16, 48, 64)), 64,
         dtype=jnp.bfloat16),
    # GQA ratios 1/2/4/8, head dims, non-causal
    Case("gqa1_d128_noncausal", (QueryGroup(0, 40, 0, 40),), 40, hq=2, hk=2, d=128, causal=False),
    Case("gqa2_d80", (QueryGroup(0, 48, 16, 64),), 64, hq=4, hk=2, d=80, dtype=jnp.bfloat16),
    Case("gqa4_noncausal_groups", (QueryGroup(0, 20, 0, 33), QueryGroup(20, 12, 0, 17)), 33,
         hq=8, hk=2, causal=False),
    Case("gqa8_d32", (QueryGroup(0, 33, 0, 33),), 33, hq=8, hk=1, d=32),
    Case("d256_f16", (QueryGroup(0, 24, 8, 32),), 32, hq=2, hk=1, d=256, dtype=jnp.float16),
    Case("d128_bf16_causal_long", (QueryGroup(0, 64, 64, 128),), 128, d=128, dtype=jnp.bfloat16),
    # segment ids: several documents, rows whose document has no visible key
    Case("segments_causal", (QueryGroup(0, 48, 0, 48),), 48, segments=True),
    Case("segments_zigzag_bf16", ga.zigzag_groups(1, 2, 16), 64, segments=True, dtype=jnp.bfloat16),
    Case("segments_noncausal_groups", (QueryGroup(0, 21, 0, 40), QueryGroup(21, 14, 10, 29)), 40,
         segments=True, causal=False, hq=4, hk=4),
    # sliding windows: left only (causal), both sides, one side, with groups,
    # GQA, segments; windows narrower and wider than a block
    Case("window_causal_left9", (QueryGroup(0, 80, 0, 80),), 80, window=(9, 0)),
    Case("window_noncausal_7_5_bf16", (QueryGroup(0, 56, 0, 56),), 56, causal=False,
         window=(7, 5), dtype=jnp.bfloat16),
    Case("window_zigzag_gqa4", ga.zigzag_groups(1, 2, 24), 96, hq=8, hk=2, window=(21, 0),
         dtype=jnp.bfloat16),
    Case("window_right_only_groups", (QueryGroup(0, 19, -6, 61), QueryGroup(19, 22, 30, 40)), 64,
         causal=False, window=(None, 6)),
    Case("window_wide_segments", (QueryGroup(0, 48, 0, 48),), 48, segments=True, window=(33, 0)),
    Case("window_cross_tq_gt_tk", (QueryGroup(0, 70, 0, 40),), 40, causal=False, window=(3, 17),
         d=128, dtype=jnp.float16),
]


# Logit soft-capping: small caps (the scores here are ~N(0, 1)), so tanh
# saturates on many pairs; with windows, segments and groups.
SOFTCAP_CASES = [
    Case("softcap_gqa_causal", (QueryGroup(0, 40, 0, 40),), 40, hq=4, hk=2, d=32,
         softcap=1.5),
    Case("softcap_zigzag_window_bf16", ga.zigzag_groups(0, 2, 16), 64, d=32,
         dtype=jnp.bfloat16, window=(9, 0), softcap=0.75),
    Case("softcap_segments_noncausal", (QueryGroup(0, 24, 0, 24), QueryGroup(24, 16, 0, 40)),
         40, hq=2, hk=1, d=64, causal=False, segments=True, softcap=3.0),
]


def case_by_name(name: str) -> Case:
  return next(c for c in CASES + SOFTCAP_CASES if c.name == name)


def make_inputs(case: Case, seed: int = 0):
  """Fresh random q, k, v (and segment ids) for ``case``; never zeros."""
  rng = np.random.default_rng(seed)
  shape_q = (case.batch, case.tq, case.hq, case.d)
  shape_kv = (case.batch, case.tk, case.hk, case.d)
  q = jnp.asarray(rng.standard_normal(shape_q), case.dtype)
  k = jnp.asarray(rng.standard_normal(shape_kv), case.dtype)
  v = jnp.asarray(rng.standard_normal(shape_kv), case.dtype)
  if not case.segments:
    return q, k, v, None, None
  # Documents of random lengths along the full kv sequence; q rows take the
  # document of their position (self-attention style), plus one id (99) that
  # no key has, so some rows see nothing.
  kv_ids = np.sort(rng.integers(0, 4, size=(case.batch, case.tk)), axis=1)
  pos, _ = ga.groups.row_positions(case.groups, case.tq)
  q_ids = kv_ids[:, np.clip(pos, 0, case.tk - 1)].copy()
  q_ids[:, ::7] = 99
  return q, k, v, jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def problem_of(case: Case) -> Problem:
  return Problem(normalize_groups(case.groups, case.tq, case.tk), case.batch, case.tq,
                 case.tk, case.hq, case.hk, case.d, case.causal, 1.0 / np.sqrt(case.d),
                 case.segments, validate.check_window(case.window, case.causal),
                 case.softcap)


def reference(case: Case, q, k, v, qs, ks):
  """fp32 reference (out in fp32, lse) on the given inputs."""
  out, lse = reference_attention(problem_of(case), q.astype(jnp.float32),
                                 k.astype(jnp.float32), v.astype(jnp.float32), qs, ks)
  return out, lse


def lowp_reference(case: Case, q, k, v, qs, ks):
  """The same attention in the input dtype (bf16/f16 matmul operands, fp32
  accumulation and softmax): the error budget of a correct 16-bit kernel."""
  return reference_attention(problem_of(case), q, k, v, qs, ks, compute_dtype=case.dtype)


def lowp_grads(case: Case, q, k, v, qs, ks, dout, dlse):
  """dq, dk, dv of the low-precision reference: its own (rounded) out and lse,
  P and dS rounded to the input dtype before their dots."""
  problem = problem_of(case)
  out, lse = reference_attention(problem, q, k, v, qs, ks, compute_dtype=case.dtype)
  return reference_backward(problem, q, k, v, qs, ks, out, lse, dout, dlse,
                            compute_dtype=case.dtype)


def assert_matches(name: str, got, want, lowp=None, *, what="", scale=None):
  """Calibrated comparison (jax_grouped_attn/testing.py) of a kernel result with the fp32
  reference ``want``; ``lowp`` is the low-precision reference (None: the
  comparison is in fp32, where the low-precision reference is ``want``);
  ``scale`` as in tolerance.check."""
  c = assert_calibrated(name, got, want, want if lowp is None else lowp, what=what, scale=scale)
  CHECKS.append((jnp.dtype(got.dtype).name, c))
  return c


def assert_close(name: str, got, want, tol, *, what=""):
  """Asserts finite and |got - want| <= atol + rtol |want| everywhere (inf must match)."""
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, f"{name}{what}: shape {got.shape} != {want.shape}"
  assert not np.isnan(got).any(), f"{name}{what}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
  inf_g, inf_w = np.isinf(got), np.isinf(want)
  assert (inf_g == inf_w).all() and (got[inf_g] == want[inf_w]).all(), (
      f"{name}{what}: infinities differ at {np.argwhere(inf_g != inf_w)[:5].tolist()}")
  atol, rtol = tol
  g, w = np.where(inf_g, 0, got), np.where(inf_w, 0, want)
  err = np.abs(g - w)
  bad = err > atol + rtol * np.abs(w)
  assert not bad.any(), (
      f"{name}{what}: {bad.sum()} of {bad.size} elements off; max err {err.max():.3g} "
      f"at {np.unravel_index(err.argmax(), err.shape)} (atol={atol}, rtol={rtol})")


# (dtype name, tolerance.Check) of every passing calibrated check in this
# process: JGA_CALIBRATION_REPORT=path writes them (conftest.py) and
# ``python -m jax_grouped_attn.testing path.*`` summarises the margins.
CHECKS = []


def check_forward(case: Case, backend: str, *, seed: int = 0, config=SMALL, jit=True, **kw):
  """Runs ``backend`` on ``case`` and asserts out/lse against the reference."""
  skip_unsupported(backend, case)
  q, k, v, qs, ks = make_inputs(case, seed)
  ref_out, ref_lse = reference(case, q, k, v, qs, ks)
  lp_out, lp_lse = lowp_reference(case, q, k, v, qs, ks)
  fn = lambda q, k, v, qs, ks: ga.grouped_attention(
      q, k, v, case.groups, causal=case.causal, q_segment_ids=qs, kv_segment_ids=ks,
      backend=backend, return_lse=True, config=config, local_window_size=case.window,
      logits_soft_cap=case.softcap, **kw)
  if jit:
    fn = jax.jit(fn)
  out, lse = fn(q, k, v, qs, ks)
  assert out.dtype == case.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (case.batch, case.hq, case.tq)
  assert_matches(case.name, out, ref_out, lp_out, what=f" out [{backend}]")
  assert_matches(case.name, lse, ref_lse, lp_lse, what=f" lse [{backend}]")
  return out, lse


def cancellation_scales(case: Case, q, k, v, qs, ks, dout, dlse):
  """(dq, dk) scales of the terms a flash backward sums: scale * P (|dP| +
  |delta|) @ |K| (and ^T @ |Q|). dS = P (dP - delta) cancels when dP ~ delta
  (e.g. a row with one visible key and a small lse cotangent: dS = dlse), and
  an fp32 kernel's rounding is relative to these terms, not to the result;
  the fp32 reference's autodiff never forms them, so it cannot show it."""
  problem = problem_of(case)
  f = lambda x: jnp.asarray(x, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  out, lse = reference(case, q, k, v, qs, ks)
  g = case.hq // case.hk
  kr, vr = jnp.repeat(f(k), g, axis=2), jnp.repeat(f(v), g, axis=2)
  s, _ = soft_cap(jnp.einsum("bqhd,bkhd->bhqk", f(q), kr, precision=hi) * problem.scale,
                  problem.softcap)
  lse_f = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
  p = jnp.where(visible_mask(problem, qs, ks), jnp.exp(s - lse_f), 0.0)
  dp = jnp.einsum("bqhd,bkhd->bhqk", f(dout), vr, precision=hi)
  delta = jnp.einsum("bqhd,bqhd->bhq", f(dout), f(out), precision=hi) - dlse
  w = p * (jnp.abs(dp) + jnp.abs(delta)[..., None])
  mag_dq = jnp.einsum("bhqk,bkhd->bqhd", w, jnp.abs(kr), precision=hi)
  mag_dk = jnp.einsum("bhqk,bqhd->bkhd", w, jnp.abs(f(q)), precision=hi)
  return (problem.scale * float(jnp.max(mag_dq)),
          problem.scale * float(jnp.max(mag_dk.reshape(*k.shape[:3], g, -1).sum(3))))


def check_grads(case: Case, backend: str, *, seed: int = 0, config=SMALL, with_lse=True,
                inputs=None, **kw):
  """Gradients wrt q, k, v under random cotangents for out (and lse) vs the reference's autodiff."""
  skip_unsupported(backend, case)
  q, k, v, qs, ks = make_inputs(case, seed) if inputs is None else inputs
  rng = np.random.default_rng(seed + 1)
  dout = jnp.asarray(rng.standard_normal(q.shape), case.dtype)
  dlse = jnp.asarray(rng.standard_normal((case.batch, case.hq, case.tq)), jnp.float32)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    total = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
    if with_lse:
      total += jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse) * dlse)
    return total

  kernel = lambda q, k, v: ga.grouped_attention(
      q, k, v, case.groups, causal=case.causal, q_segment_ids=qs, kv_segment_ids=ks,
      backend=backend, return_lse=True, config=config, local_window_size=case.window,
      logits_soft_cap=case.softcap, **kw)
  ref = lambda q, k, v: reference(case, q, k, v, qs, ks)
  got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  dlse_used = dlse if with_lse else jnp.zeros_like(dlse)
  lowp = lowp_grads(case, q, k, v, qs, ks, dout, dlse_used)
  # fp32: the low-precision reference is the reference, so the floor must
  # cover the kernel's own rounding of the terms dq and dk cancel from.
  scales = ((*cancellation_scales(case, q, k, v, qs, ks, dout, dlse_used), None)
            if case.dtype == jnp.float32 else (None, None, None))
  for name, g, w, lp, x, sc in zip("qkv", got, want, lowp, (q, k, v), scales):
    assert g.dtype == x.dtype and g.shape == x.shape, f"d{name}: {g.dtype} {g.shape}"
    assert_matches(case.name, g, w, lp, what=f" d{name} [{backend}]", scale=sc)
  return got
