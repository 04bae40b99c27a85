"""A value head_dim of its own (MLA: q, k [..., Dqk], v [..., Dv], out [..., Dv]).

The reference (the ``xla`` backend) computes it and is checked against the
formula written out here, with every context-parallel strategy; the kernel
backends refuse it with an error naming the shapes (not yet built).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
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


@pytest.mark.parametrize("backend", [b.name for b in registry.kernel_entries()])
def test_kernel_backends_refuse_it_by_name(backend):
  q, k, v, _ = _inputs(4)
  problem = ga.validate.make_problem(q, k, v, (ga.QueryGroup(0, 32, 0, 32),), causal=True,
                                     softmax_scale=None, q_segment_ids=None,
                                     kv_segment_ids=None)
  why = registry.get(backend).supports(problem, jnp.bfloat16)
  assert why is not None and "v's head_dim 16 != q/k's 48" in why
  if registry.get(backend).unavailable(jax.default_backend()) is None:
    with pytest.raises(ValueError, match="v's head_dim 16 != q/k's 48"):
      ga.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=True, backend=backend)


@pytest.mark.parametrize("dv", [12, 264])
def test_bad_value_head_dims_name_v(dv):
  q, k, _, _ = _inputs(5)
  v = jnp.ones(k.shape[:3] + (dv,), jnp.float32)
  with pytest.raises(ValueError, match=r"v.shape\[3\]"):
    ga.attention(q, k, v, backend="xla")
  with pytest.raises(ValueError, match="same batch, length and heads"):
    ga.attention(q, k, v[:, :5], backend="xla")
