"""A value head_dim of its own (MLA: q, k [..., Dqk], v [..., Dv], out [..., Dv]).

The reference (the ``xla`` backend) computes it and is checked against the
formula written out here, with every context-parallel strategy; every kernel
backend against the reference (zero-padding v to q/k's width, or q/k to v's).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from cases import KERNEL_BACKENDS, SMALL
from jax_grouped_attn import registry


def formula(q, k, v, causal=True):
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, precision="highest") / np.sqrt(q.shape[-1])
  if causal:
    t, tk = q.shape[1], k.shape[1]
    s = jnp.where(np.arange(tk)[None] <= np.arange(tk - t, tk)[:, None], s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vr, precision="highest")


def _inputs(seed, b=2, t=32, hq=4, hk=2, dqk=48, dv=16):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, hq, dqk)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, hk, dqk)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hk, dv)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((b, t, hq, dv)), jnp.float32)
  return q, k, v, dout


def _close(got, want, rel=2e-5):
  for g, w in zip(got, want):
    assert g.shape == w.shape
    err = float(jnp.max(jnp.abs(g - w)))
    assert err <= rel * max(1.0, float(jnp.max(jnp.abs(w)))), err


@pytest.mark.parametrize("dqk,dv", [(48, 16), (16, 64), (192, 128)])
def test_reference_with_its_own_value_head_dim(dqk, dv):
  q, k, v, dout = _inputs(1, dqk=dqk, dv=dv)
  out, vjp = jax.vjp(lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla"), q, k, v)
  want, vjp_w = jax.vjp(formula, q, k, v)
  assert out.shape == q.shape[:3] + (dv,)
  _close((out, *vjp(dout)), (want, *vjp_w(dout)))
  # The explicit backward (the ring's) agrees with autodiff.
  from jax_grouped_attn.reference import reference_attention, reference_backward
  problem = ga.validate.make_problem(q, k, v, (ga.QueryGroup(0, 32, 0, 32),), causal=True,
                                     softmax_scale=None, q_segment_ids=None,
                                     kv_segment_ids=None)
  assert problem.head_dim == dqk and problem.dv == dv
  o, lse = reference_attention(problem, q, k, v)
  _close(reference_backward(problem, q, k, v, None, None, o, lse, dout,
                            jnp.zeros_like(lse)), vjp_w(dout))


@pytest.mark.parametrize("strategy", ["allgather", "ring", "ulysses"])
def test_every_strategy_with_its_own_value_head_dim(strategy):
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.make_mesh((4,), ("cp",), devices=jax.devices()[:4])
  q, k, v, dout = _inputs(2, b=1, t=64, hq=4, hk=4)
  cp = lambda q, k, v: ga.context_parallel_attention(q, k, v, mesh, "cp", strategy=strategy,
                                                     causal=True, backend="xla")
  got_out, vjp = jax.vjp(cp, q, k, v)
  want_out, vjp_w = jax.vjp(formula, q, k, v)
  _close((got_out, *vjp(dout)), (want_out, *vjp_w(dout)), rel=1e-4)


def test_dropin_with_its_own_value_head_dim():
  q, k, v, _ = _inputs(3)
  got = ga.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  _close((got,), (formula(q, k, v),))


def _grouped_vs_reference(backend, dqk, dv, dtype=jnp.float32, seed=6, config=None):
  """(got, want) out, lse, dq, dk, dv of two zigzag groups (rank 0 of 2) with random
  cotangents: ``backend`` against the reference."""
  groups = ga.zigzag_groups(0, 2, 24)
  q, k, v, _ = _inputs(seed, b=2, t=96, hq=4, hk=2, dqk=dqk, dv=dv)
  q = q[:, :48]
  rng = np.random.default_rng(seed + 1)
  dout = jnp.asarray(rng.standard_normal(q.shape[:3] + (dv,)), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, 4, 48)), jnp.float32)
  q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))

  def run(backend, config, q, k, v):
    fn = lambda q, k, v: ga.grouped_attention(q, k, v, groups, causal=True, backend=backend,
                                              config=config, return_lse=True)
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    return (out, lse, *vjp((dout.astype(out.dtype), dlse)))

  f32 = lambda x: x.astype(jnp.float32)
  got = jax.jit(lambda q, k, v: run(backend, config, q, k, v))(q, k, v)
  want = run("xla", None, f32(q), f32(k), f32(v))
  if dtype == jnp.float32:
    return got, want
  # The plain attention in ``dtype`` (matmul operands rounded): the calibration.
  from jax_grouped_attn.reference import reference_attention, reference_backward  # noqa: PLC0415
  problem = ga.validate.make_problem(q, k, v, groups, causal=True, softmax_scale=None,
                                     q_segment_ids=None, kv_segment_ids=None)
  out, lse = reference_attention(problem, q, k, v, compute_dtype=dtype)
  grads = reference_backward(problem, q, k, v, None, None, out, lse, dout, dlse,
                             compute_dtype=dtype)
  return got, want, (out, lse, *grads)


@pytest.mark.parametrize("dqk,dv", [(48, 16), (16, 40)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_with_their_own_value_head_dim(backend, dqk, dv):
  # Forward, lse and the three gradients, across block boundaries (small tiles).
  why = registry.get(backend).supports(_problem(dqk, dv), jnp.float32)
  if why is not None:
    pytest.skip(why)
  got, want = _grouped_vs_reference(backend, dqk, dv, config=SMALL)
  assert got[0].shape == (2, 48, 4, dv) and got[4].shape == (2, 96, 2, dv)
  _close(got, want, rel=2e-4)


def _problem(dqk, dv):
  q, k, v, _ = _inputs(4, dqk=dqk, dv=dv)
  return ga.validate.make_problem(q, k, v, (ga.QueryGroup(0, 32, 0, 32),), causal=True,
                                  softmax_scale=None, q_segment_ids=None, kv_segment_ids=None)


def test_kernel_tiles_and_configs_follow_the_wider_head_dim():
  assert _problem(48, 16).tile_head_dim == 48 and _problem(64, 256).tile_head_dim == 256
  assert all(b.supports_head_dim_v for b in registry.kernel_entries())


@pytest.mark.gpu
@pytest.mark.parametrize("dqk,dv", [(192, 128), (128, 64), (64, 128)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_value_head_dim_on_gpu_bf16(backend, dqk, dv):
  # Default tiles, bf16, calibrated against the same attention in bf16.
  from jax_grouped_attn.testing import assert_calibrated  # noqa: PLC0415
  if (why := registry.get(backend).supports(_problem(dqk, dv), jnp.bfloat16)) is not None:
    pytest.skip(why)
  got, want, lowp = _grouped_vs_reference(backend, dqk, dv, dtype=jnp.bfloat16)
  for name, g, w, lp in zip(("out", "lse", "dq", "dk", "dv"), got, want, lowp):
    assert_calibrated(f"{backend} Dqk {dqk} Dv {dv}", g, w, lp, what=f" {name}")


@pytest.mark.parametrize("dv", [12, 264])
def test_bad_value_head_dims_name_v(dv):
  q, k, _, _ = _inputs(5)
  v = jnp.ones(k.shape[:3] + (dv,), jnp.float32)
  with pytest.raises(ValueError, match=r"v.shape\[3\]"):
    ga.attention(q, k, v, backend="xla")
  with pytest.raises(ValueError, match="same batch, length and heads"):
    ga.attention(q, k, v[:, :5], backend="xla")
