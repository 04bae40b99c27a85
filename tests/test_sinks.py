"""Attention sinks (``sinks=[Hq]``: one extra logit per query head, no value).

Checked against the softmax with the extra column written out here: out, lse
and the gradients of q, k, v and the sinks, for the reference, every kernel
backend, the drop-in and the Flax function. Context-parallel strategies:
tests/test_parallel.py (test_sinks_*).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import KERNEL_BACKENDS, SMALL
from jax_grouped_attn import QueryGroup

make_attention_fn = pytest.importorskip("jax_grouped_attn.flax").make_attention_fn


def formula(q, k, v, sinks, *, causal=True, window=None, q_pos=None):
  """(out, lse) with the sink column written out: [B, T, H, D] inputs, fp32."""
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, precision="highest") / np.sqrt(q.shape[-1])
  tq, tk = q.shape[1], k.shape[1]
  i = (np.arange(tq) if q_pos is None else q_pos)[:, None]
  j = np.arange(tk)[None, :]
  mask = np.ones((tq, tk), bool)
  if causal:
    mask &= j <= i
  if window is not None:
    mask &= i - j <= window
  s = jnp.where(mask, s, -jnp.inf)
  sink = jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))
  full = jnp.concatenate([s, sink], axis=-1)               # the sink: one more logit
  p = jax.nn.softmax(full, axis=-1)[..., :-1]              # ... with no value
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vr, precision="highest")
  return out, jax.nn.logsumexp(full, axis=-1)


def _inputs(seed, b=2, t=32, hq=4, hk=2, d=32, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for h in (hq, hk, hk))
  sinks = jnp.asarray(rng.standard_normal(hq) + 1.0, jnp.float32)
  dout = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((b, hq, t)), jnp.float32)
  return q, k, v, sinks, dout, dlse


def _all(fn, q, k, v, sinks, dout, dlse):
  """(out, lse, dq, dk, dv, dsinks) of fn(q, k, v, sinks) -> (out, lse)."""
  (out, lse), vjp = jax.vjp(fn, q, k, v, sinks)
  return (out, lse) + vjp((dout.astype(out.dtype), dlse))


def _assert_close(got, want, names=("out", "lse", "dq", "dk", "dv", "dsinks"), rel=2e-5):
  for name, g, w in zip(names, got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert g.shape == w.shape and np.isfinite(g).all(), name
    err = float(np.max(np.abs(g - w)))
    assert err <= rel * max(1.0, float(np.max(np.abs(w)))), (name, err)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_is_the_sink_formula(window):
  q, k, v, sinks, dout, dlse = _inputs(1)
  lw = None if window is None else (window, 0)
  fn = lambda q, k, v, s: ga.attention(q, k, v, causal=True, backend="xla", sinks=s,
                                       return_lse=True, local_window_size=lw)
  want = _all(lambda q, k, v, s: formula(q, k, v, s, window=window), q, k, v, sinks, dout, dlse)
  _assert_close(jax.jit(lambda *a: _all(fn, *a))(q, k, v, sinks, dout, dlse), want)
  # The sinks matter here, and d sinks is not zero.
  plain = ga.attention(q, k, v, causal=True, backend="xla", local_window_size=lw)
  assert float(jnp.max(jnp.abs(plain - want[0]))) > 0.05
  assert float(jnp.min(jnp.abs(want[5]))) > 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_with_sinks(backend):
  # Grouped queries (zigzag rank 0 of 2) through each kernel's forward and its
  # backward with the lse cotangent that the sink feeds back.
  c = 8
  groups = ga.zigzag_groups(0, 2, c)
  q_pos = ga.groups.row_positions(groups, 2 * c)[0]
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 2 * c, 4, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 4 * c, 2, 32)), jnp.float32) for _ in "kv")
  sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, 4, 2 * c)), jnp.float32)
  fn = lambda q, k, v, s: ga.grouped_attention(q, k, v, groups, backend=backend, config=SMALL,
                                               sinks=s, return_lse=True)
  got = jax.jit(lambda *a: _all(fn, *a))(q, k, v, sinks, dout, dlse)
  want = _all(lambda q, k, v, s: formula(q, k, v, s, q_pos=q_pos), q, k, v, sinks, dout, dlse)
  _assert_close(got, want, rel=2e-4)


def test_a_row_that_sees_nothing_gets_zero_and_the_sink():
  q, k, v, sinks, _, _ = _inputs(3, b=1, t=8)
  groups = (QueryGroup(0, 4, 0, 0), QueryGroup(4, 4, 0, 8))
  out, lse = ga.grouped_attention(q, k, v, groups, backend="xla", sinks=sinks,
                                  return_lse=True)
  assert (np.asarray(out[:, :4]) == 0).all()
  np.testing.assert_array_equal(np.asarray(lse[0, :, :4]),
                                np.broadcast_to(np.asarray(sinks)[:, None], (4, 4)))
  assert np.isfinite(np.asarray(out)).all()


def test_bf16_sinks_keep_the_dtype_and_stay_close():
  q, k, v, sinks, _, _ = _inputs(4, dtype=jnp.bfloat16)
  out = ga.attention(q, k, v, causal=True, backend=KERNEL_BACKENDS[0] if KERNEL_BACKENDS
                     else "xla", sinks=sinks)
  want = formula(*(x.astype(jnp.float32) for x in (q, k, v)), sinks)[0]
  assert out.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - want))) < 3e-2


@pytest.mark.parametrize("bad,error,match", [
    (np.zeros(3, np.float32), ValueError, r"sinks must have shape \[Hq\] = \(4,\)"),
    (np.zeros((1, 4), np.float32), ValueError, r"sinks.shape=\(1, 4\)"),
    (np.zeros(4, np.int32), TypeError, "sinks must be a floating array"),
    ([0.0, 0.0, 0.0, 0.0], TypeError, "sinks must be None or a float array"),
])
def test_bad_sinks_name_the_argument(bad, error, match):
  q, k, v, _, _, _ = _inputs(5)
  with pytest.raises(error, match=match):
    ga.attention(q, k, v, backend="xla", sinks=bad)
  with pytest.raises(error, match=match):
    ga.dot_product_attention(q, k, v, implementation="xla", sinks=bad)


def test_dropin_and_flax_take_sinks():
  q, k, v, sinks, dout, dlse = _inputs(6)
  want = formula(q, k, v, sinks)[0]
  got = ga.dot_product_attention(q, k, v, is_causal=True, implementation="xla", sinks=sinks)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  fn = make_attention_fn(causal=True, backend="xla", sinks=sinks)
  np.testing.assert_allclose(fn(q, k, v), want, atol=2e-5, rtol=2e-5)
  # jax.nn's rows without a key give the mean of value; with a sink they give 0.
  lengths = jnp.array([32, 20])
  got = ga.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla",
                                 sinks=sinks)
  assert np.isfinite(np.asarray(got)).all()


def test_the_kernels_backward_gets_the_callers_dout_and_the_lse_with_the_sink(monkeypatch):
  # Autodiff through the merge would hand it dO * exp(lse - lse_sink) rounded
  # to bf16: 40% more dV error than the calibrated budget at S8192 (H200).
  from jax_grouped_attn import autodiff  # noqa: PLC0415
  seen = {}
  real = autodiff.backward

  def spy(*args):
    seen["lse"], seen["dout"] = args[8], args[9]
    return real(*args)

  monkeypatch.setattr(autodiff, "backward", spy)
  rng = np.random.default_rng(7)
  q, k, v, do = (jnp.asarray(rng.standard_normal((1, 16, 2, 32)), jnp.bfloat16) for _ in "qkvd")
  sinks = jnp.asarray([1.5, -0.5], jnp.float32)
  fn = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="pallas_triton", config=SMALL,
                                    sinks=sinks, return_lse=True)
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  vjp((do, jnp.zeros_like(lse)))
  np.testing.assert_array_equal(np.asarray(seen["dout"]), np.asarray(do))
  np.testing.assert_array_equal(np.asarray(seen["lse"]), np.asarray(lse))
