"""jax_grouped_attn.dot_product_attention against jax.nn.dot_product_attention.

The ground truth is jax.nn's own xla implementation on float32 copies of the
inputs; jax.nn on the inputs' dtype is the low-precision attention whose error
calibrates the tolerance (jax_grouped_attn/testing.py), forward and gradients. Every row
is compared, padding rows and rows that see no key included (jax.nn gives 0
and the mean of value there).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import seed_of
from jax_grouped_attn import registry, validate
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.testing import assert_calibrated

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@dataclasses.dataclass(frozen=True)
class DCase:
  name: str
  tq: int
  tk: int
  hq: int = 4
  hk: int = 2
  causal: bool = False
  lengths: str = "none"      # "none", "q", "kv", "both", "kv0" (both, a kv length 0)
  window: object = None      # local_window_size
  dtype: object = F32
  d: int = 32
  batch: int = 2

  def __str__(self):
    return self.name


CASES = [
    # Tq == Tk, Tq < Tk, Tq > Tk; MHA / GQA / MQA; causal (top-left) or not
    DCase("self_mha_f32", 24, 24, 4, 4),
    DCase("self_causal_gqa_bf16", 24, 24, 4, 2, causal=True, dtype=BF16),
    DCase("cross_short_q_mqa_f16", 17, 40, 4, 1, dtype=F16),
    DCase("cross_short_q_causal_bf16", 17, 40, 4, 2, causal=True, dtype=BF16),
    DCase("cross_long_q_causal_f32", 40, 17, 4, 2, causal=True),
    DCase("cross_long_q_mha_bf16", 40, 17, 2, 2, dtype=BF16),
    # sequence lengths (padding rows -> 0; kv length 0 -> rows see no key)
    DCase("lengths_causal_gqa_bf16", 24, 24, 4, 2, causal=True, lengths="both", dtype=BF16),
    DCase("lengths_kv0_mqa_f16", 17, 40, 4, 1, lengths="kv0", dtype=F16),
    DCase("lengths_q_causal_f32", 40, 17, 4, 2, causal=True, lengths="q"),
    DCase("lengths_kv_cross_f32", 17, 40, 4, 2, lengths="kv"),
    DCase("lengths_kv0_causal_f32", 24, 24, 4, 4, causal=True, lengths="kv0"),
    # windows: int, (l, r), (l, 0) with causal; rows past the keys see nothing
    DCase("window_int_f32", 24, 24, 4, 2, window=3),
    DCase("window_int_long_q_bf16", 40, 17, 4, 2, window=3, dtype=BF16),
    DCase("window_lr_short_q_f16", 17, 40, 4, 1, window=(2, 5), dtype=F16),
    DCase("window_right_only_f32", 24, 24, 4, 2, window=(0, 3)),
    DCase("window_left_causal_bf16", 24, 24, 4, 2, causal=True, window=(4, 0), dtype=BF16),
    DCase("window_left_causal_long_q_f32", 40, 17, 4, 2, causal=True, window=(4, 0)),
    DCase("window_left_causal_lengths_bf16", 24, 24, 4, 2, causal=True, window=(5, 0),
          lengths="both", dtype=BF16),
    DCase("window_lr_lengths_kv0_f32", 17, 40, 4, 2, window=(2, 5), lengths="kv0"),
    DCase("window_lr_causal_f16", 24, 24, 4, 1, causal=True, window=(6, 2), dtype=F16),
    # head dims below 32 and unpadded ones
    DCase("d8_causal_lengths_f32", 24, 24, 4, 2, causal=True, lengths="both", d=8),
    DCase("d80_window_bf16", 24, 33, 4, 2, window=(7, 7), d=80, dtype=BF16),
]
XLA_IDS = [c.name for c in CASES]

# A small subset on the Triton kernels (interpreted on CPU). Window cases skip
# with the backend's own reason until its window kernels land, then run.
TRITON = ["self_causal_gqa_bf16", "cross_long_q_causal_f32", "lengths_kv0_mqa_f16",
          "window_left_causal_lengths_bf16", "window_int_long_q_bf16", "d8_causal_lengths_f32"]


def case_by_name(name):
  return next(c for c in CASES if c.name == name)


def lengths_of(case: DCase):
  """(query_seq_lengths, key_value_seq_lengths) int32 [B] or None."""
  rng = np.random.default_rng(seed_of(case.name) + 7)
  ql = kl = None
  if case.lengths in ("q", "both", "kv0"):
    ql = rng.integers(1, case.tq, size=case.batch)
    ql[-1] = case.tq
  if case.lengths in ("kv", "both", "kv0"):
    kl = rng.integers(1, case.tk, size=case.batch)
    if case.lengths == "kv0":
      kl[0] = 0
  cast = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return cast(ql), cast(kl)


def inputs_of(case: DCase):
  rng = np.random.default_rng(seed_of(case.name))
  mk = lambda t, h: jnp.asarray(rng.standard_normal((case.batch, t, h, case.d)), case.dtype)
  return mk(case.tq, case.hq), mk(case.tk, case.hk), mk(case.tk, case.hk)


def kwargs_of(case: DCase, ql, kl):
  return dict(is_causal=case.causal, query_seq_lengths=ql, key_value_seq_lengths=kl,
              local_window_size=case.window)


def jax_nn(q, k, v, ql, kl, case, **kw):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla",
                                      **kwargs_of(case, ql, kl), **kw)


def out_and_grads(f, q, k, v, ql, kl, dout, *, jit=True):
  """(out, (dq, dk, dv)) of f(q, k, v, ql, kl) under the cotangent ``dout``, in
  one jitted call; the lengths are traced arguments."""
  def run(q, k, v, ql, kl, dout):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, ql, kl), q, k, v)
    return out, vjp(dout.astype(out.dtype))
  return (jax.jit(run) if jit else run)(q, k, v, ql, kl, dout)


def ours(backend, case):
  """Our drop-in, jitted, lengths as traced arguments."""
  return jax.jit(lambda q, k, v, ql, kl: ga.dot_product_attention(
      q, k, v, implementation=backend, **kwargs_of(case, ql, kl)))


def skip_unsupported(backend: str, case: DCase):
  """pytest.skip with the backend's own reason (e.g. no window kernels yet)."""
  has_seg = case.lengths != "none"
  problem = Problem((QueryGroup(0, case.tq, 0, case.tk),), case.batch, case.tq, case.tk,
                    case.hq, case.hk, case.d, case.causal, 1 / math.sqrt(case.d), has_seg,
                    validate.check_window(case.window, case.causal))
  why = registry.get(backend).supports(problem, case.dtype)
  if why is not None:
    pytest.skip(why)


def f32(*xs):
  return tuple(None if x is None else x.astype(F32) for x in xs)


def check_case(case: DCase, backend: str):
  skip_unsupported(backend, case)
  q, k, v = inputs_of(case)
  ql, kl = lengths_of(case)
  dout = jnp.asarray(np.random.default_rng(seed_of(case.name) + 1).standard_normal(q.shape),
                     case.dtype)
  mine = lambda q, k, v, ql, kl: ga.dot_product_attention(
      q, k, v, implementation=backend, **kwargs_of(case, ql, kl))
  nn = lambda q, k, v, ql, kl: jax_nn(q, k, v, ql, kl, case)
  out, got = out_and_grads(mine, q, k, v, ql, kl, dout)
  want_out, want = out_and_grads(nn, *f32(q, k, v), ql, kl, dout.astype(F32))
  # jax.nn asks for F16_F16_F32 dots on float16, which XLA:CPU rejects when
  # compiling; jax.nn falls back to the default precision only when that
  # error comes at once, i.e. eagerly.
  lowp_out, lowp = out_and_grads(nn, q, k, v, ql, kl, dout, jit=case.dtype != F16)
  # Forward: every row, padding and key-less rows included.
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_calibrated(case.name, out, want_out, lowp_out, what=f" out [{backend}]")
  if ql is not None:   # rows beyond query_seq_lengths are exactly 0, as in jax.nn
    pad = np.arange(case.tq)[None, :] >= np.asarray(ql)[:, None]
    assert (np.asarray(out.astype(F32))[pad] == 0).all()
  # Gradients under a random cotangent.
  for n, g, w, lp, x in zip("qkv", got, want, lowp, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert_calibrated(case.name, g, w, lp, what=f" d{n} [{backend}]")


@pytest.mark.parametrize("case", CASES, ids=XLA_IDS)
def test_matches_jax_nn_xla(case):
  check_case(case, "xla")


@pytest.mark.parametrize("name", TRITON)
def test_matches_jax_nn_triton(name):
  check_case(case_by_name(name), "triton")


def test_rows_without_keys_are_jax_nns_mean_of_value():
  """What jax.nn returns where no key is visible (a uniform average over the
  masked logits, i.e. the mean of value over all Tk keys) and for padding rows
  (0), checked directly."""
  case = case_by_name("lengths_kv0_mqa_f16")
  q, k, v = inputs_of(case)
  ql, kl = lengths_of(case)
  assert int(kl[0]) == 0 and int(ql[0]) < case.tq
  out = np.asarray(ours("xla", case)(q, k, v, ql, kl).astype(F32))
  mean_v = np.asarray(v[0].astype(F32)).mean(0)                 # [K, H], K = 1
  valid = int(ql[0])
  np.testing.assert_allclose(out[0, :valid], np.broadcast_to(mean_v, out[0, :valid].shape),
                             rtol=2e-3, atol=2e-3)
  assert (out[0, valid:] == 0).all()
  ref = np.asarray(jax_nn(q, k, v, ql, kl, case).astype(F32))
  np.testing.assert_allclose(out[0], ref[0], rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("name", ["lengths_causal_gqa_bf16", "window_int_long_q_bf16",
                                  "lengths_kv0_mqa_f16", "window_lr_lengths_kv0_f32"])
def test_return_residual(name):
  """The residual is jax.nn's: the log-sum-exp [B, T, N] in the input dtype;
  jax.nn's -0.7 * float32 max (f16: -inf) on padding rows and rows without keys."""
  case = case_by_name(name)
  q, k, v = inputs_of(case)
  ql, kl = lengths_of(case)
  mine = lambda q, k, v, ql, kl: ga.dot_product_attention(
      q, k, v, implementation="xla", return_residual=True, **kwargs_of(case, ql, kl))
  out, res = jax.jit(mine)(q, k, v, ql, kl)
  _, want = jax_nn(*f32(q, k, v), ql, kl, case, return_residual=True)
  _, lowp = jax_nn(q, k, v, ql, kl, case, return_residual=True)
  assert res.shape == lowp.shape == (case.batch, case.tq, case.hq) and res.dtype == q.dtype
  masked = np.asarray(want) < -1e37
  assert masked.any()        # every case here has such rows
  r, lp = np.asarray(res.astype(F32)), np.asarray(lowp.astype(F32))
  np.testing.assert_array_equal(r[masked], lp[masked])
  assert_calibrated(case.name, jnp.where(masked, 0, res), jnp.where(masked, 0, want),
                    jnp.where(masked, 0, lowp), what=" residual")
  # No gradient flows through the residual (jax.nn stops it too).
  g = jax.jit(jax.grad(lambda q: mine(q, k, v, ql, kl)[1].astype(F32).sum()))(q)
  assert not np.asarray(g.astype(F32)).any()


def test_rank3_inputs_and_masks():
  """[T, N, H] inputs as jax.nn takes them; a causal or all-True mask of any
  rank that broadcasts to [B, N, T, S] (jax.nn prepends axes)."""
  case = case_by_name("cross_long_q_causal_f32")
  q, k, v = (x[0] for x in inputs_of(case))
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  got = ga.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  assert got.shape == q.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  tril = np.tril(np.ones((case.tq, case.tk), bool))
  for mask in (tril, tril[None], jnp.asarray(tril)[None, None],
               np.broadcast_to(tril, (1, case.hq, case.tq, case.tk))):
    got = ga.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # mask AND is_causal is still causal
    got = ga.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  full = jax.nn.dot_product_attention(q, k, v)
  got = ga.dot_product_attention(q, k, v, mask=np.ones((1, 1, case.tq, case.tk), bool))
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [jnp.float32(0.1), np.float64(0.3), 0.2, jnp.asarray(0.25)])
def test_scale_concrete_scalars(scale):
  case = case_by_name("self_causal_gqa_bf16")
  q, k, v = f32(*inputs_of(case))
  want = jax.nn.dot_product_attention(q, k, v, scale=float(scale), is_causal=True)
  got = jax.jit(lambda q, k, v: ga.dot_product_attention(q, k, v, scale=scale, is_causal=True))(
      q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _arr(shape, dtype=F32):
  return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


Q, K = _arr((2, 8, 4, 16)), _arr((2, 8, 2, 16))
TRIL = np.tril(np.ones((8, 8), bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=jnp.zeros((1, 1, 8, 8))), "bias"),
    (dict(mask=~TRIL), "mask"),                                    # neither causal nor all True
    (dict(mask=np.triu(np.ones((8, 8), bool))), "mask"),
    (dict(mask=TRIL.astype(np.float32)), "mask"),                   # not boolean (jax.nn neither)
    (dict(mask=np.ones((3, 8, 8), bool)), "mask"),                  # does not broadcast
    (dict(scale=-1.0), "scale"),
    (dict(scale="0.1"), "scale"),
    (dict(implementation="cudnn"), "cudnn"),
    (dict(implementation="cuda"), "implementation"),
    (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), "query_seq_lengths"),
    (dict(key_value_seq_lengths=jnp.ones((2,), jnp.float32)), "key_value_seq_lengths"),
    (dict(local_window_size=-1), "local_window_size"),
    (dict(is_causal=1), "is_causal"),
    (dict(return_residual=None), "return_residual"),
])
def test_unsupported_arguments_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ga.dot_product_attention(Q, K, K, **kwargs)


def test_cudnn_error_says_it_is_jax_nns():
  with pytest.raises(ValueError, match="jax.nn"):
    ga.dot_product_attention(Q, K, K, implementation="cudnn")


def test_traced_mask_and_scale_raise():
  with pytest.raises(ValueError, match="mask is a traced array"):
    jax.jit(lambda m: ga.dot_product_attention(Q, K, K, mask=m))(jnp.asarray(TRIL))
  with pytest.raises(ValueError, match="scale is a traced value"):
    jax.jit(lambda s: ga.dot_product_attention(Q, K, K, scale=s))(jnp.float32(0.1))


@pytest.mark.parametrize("shapes,match", [
    (((8, 16), (8, 2, 16), (8, 2, 16)), "query"),
    (((2, 8, 4, 16), (1, 2, 8, 2, 16), (2, 8, 2, 16)), "key"),
    (((2, 8, 4, 12), (2, 8, 2, 12), (2, 8, 2, 12)), "head_dim"),
    (((2, 8, 3, 16), (2, 8, 2, 16), (2, 8, 2, 16)), "Hq"),
])
def test_bad_shapes_raise(shapes, match):
  q, k, v = (_arr(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    ga.dot_product_attention(q, k, v)
