"""Ulysses and 2-D context parallelism vs the single-device reference.

Same inputs and checks as test_parallel.py (outputs, lse and gradients under
random cotangents against the fp32 reference on the natural-order sequence),
on 1-8 CPU host devices: "ulysses" on one axis, and 2-D meshes with
"allgather" or "ring" over the outer axis and Ulysses over the inner one.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_parallel import _inputs, assert_cp_matches

import jax_grouped_attn as ga
from cases import KERNEL_BACKENDS, SMALL, assert_matches
from jax_grouped_attn.cp import ContextParallel, Strategy, TwoD, kv_head_repeats

F32, BF16 = jnp.float32, jnp.bfloat16


def _mesh(shape, names):
  """A mesh with Auto axes (what a user's shard_map over sharded inputs takes)."""
  n = int(np.prod(shape))
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices, have {jax.device_count()}")
  return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def check(mesh, axis_name, strategy, backend="xla", *, ulysses_axis_name=None, causal=True,
          dtype=F32, hq=4, hk=2, d=32, b=2, chunk=8, segments=None, seed=0,
          batch_axis_name=None, config=SMALL, window=None):
  """context_parallel_attention on ``mesh`` == reference: out, lse, dq, dk, dv."""
  cp = ContextParallel(axis_name, strategy, ulysses_axis_name)
  world = int(np.prod([mesh.shape[n] for n in cp.sequence_axes]))
  s = 2 * world * chunk
  q, k, v, dout, dlse, seg = _inputs(seed, b=b, s=s, hq=hq, hk=hk, d=d, dtype=dtype,
                                     segments=segments)
  fn = lambda q, k, v: ga.context_parallel_attention(
      q, k, v, mesh, axis_name, strategy=strategy, ulysses_axis_name=ulysses_axis_name,
      causal=causal, backend=backend, return_lse=True, batch_axis_name=batch_axis_name,
      config=None if backend == "xla" else config, local_window_size=window, **seg)
  assert_cp_matches(f"{dict(mesh.shape)}-{strategy}-{ulysses_axis_name}-{backend}-{window}",
                    fn, q, k, v, dout, dlse, seg, causal=causal, window=window)


# ------------------------------------------------------------ ulysses, 1-D --

ULYSSES_MATRIX = [
    # (world, causal, dtype, hq, hk, segments)
    (1, True, F32, 4, 2, None),
    (2, False, BF16, 8, 2, "shared"),
    (4, True, F32, 4, 4, "split"),   # Hk % W == 0: kv heads split; rows that see nothing
    (4, True, BF16, 8, 2, "shared"),  # Hk % W != 0: kv heads repeated twice
    (8, True, F32, 8, 1, None),       # MQA: the one kv head on every device
]


@pytest.mark.parametrize("world,causal,dtype,hq,hk,segments", ULYSSES_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_ulysses_matches_reference(world, causal, dtype, hq, hk, segments):
  check(_mesh((world,), ("cp",)), "cp", "ulysses", causal=causal, dtype=dtype, hq=hq, hk=hk,
        segments=segments, seed=20 + world)


def test_ulysses_over_a_tuple_axis_with_a_batch_axis():
  mesh = _mesh((2, 2, 2), ("data", "x", "y"))
  check(mesh, ("x", "y"), "ulysses", hq=4, hk=2, segments="shared", seed=31,
        batch_axis_name="data")


def test_kv_head_repeats():
  assert kv_head_repeats(8, 4) == 1
  assert kv_head_repeats(8, 16) == 2     # 8 kv heads over 16 query-head slices
  assert kv_head_repeats(3, 2) == 2      # Hk=3, W=2: lcm 6 kv heads
  assert kv_head_repeats(1, 8) == 8


# ------------------------------------------------------------------- 2-D --

TWO_D_MATRIX = [
    # (outer, inner, strategy, causal, dtype, hq, hk, segments)
    (2, 2, "ring", True, F32, 4, 2, "shared"),
    (2, 2, "allgather", True, BF16, 4, 2, "split"),
    (2, 4, "ring", True, F32, 8, 2, "shared"),    # kv heads repeated twice
    (2, 4, "allgather", False, F32, 4, 4, None),
    (4, 2, "ring", True, BF16, 2, 1, None),
]


@pytest.mark.parametrize("outer,inner,strategy,causal,dtype,hq,hk,segments", TWO_D_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_two_d_matches_reference(outer, inner, strategy, causal, dtype, hq, hk, segments):
  mesh = _mesh((outer, inner), ("node", "gpu"))
  check(mesh, "node", strategy, ulysses_axis_name="gpu", causal=causal, dtype=dtype, hq=hq,
        hk=hk, segments=segments, seed=40 + outer * inner)


WINDOW_MATRIX = [
    # (outer, inner, strategy, causal, window, hq, hk, segments); "ulysses":
    # plain Ulysses over ``outer`` devices (inner unused)
    (2, 1, "ulysses", True, (5, None), 4, 2, None),
    (4, 1, "ulysses", False, (3, 9), 8, 2, "shared"),   # kv heads repeated; order matters now
    (8, 1, "ulysses", True, (20, None), 8, 1, None),
    (2, 2, "ring", True, (11, None), 4, 2, "shared"),
    (2, 2, "allgather", False, (6, 2), 4, 2, None),
    (2, 4, "ring", False, (None, 20), 8, 2, "split"),
    (4, 2, "allgather", True, (40, None), 2, 1, None),
]


@pytest.mark.parametrize("outer,inner,strategy,causal,window,hq,hk,segments", WINDOW_MATRIX,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_sliding_window_matches_reference(outer, inner, strategy, causal, window, hq, hk,
                                          segments):
  kw = dict(causal=causal, hq=hq, hk=hk, segments=segments, seed=80 + outer * inner,
            window=window)
  if strategy == "ulysses":
    check(_mesh((outer,), ("cp",)), "cp", "ulysses", **kw)
  else:
    check(_mesh((outer, inner), ("node", "gpu")), "node", strategy, ulysses_axis_name="gpu",
          **kw)


def test_two_d_with_a_kernel_backend():
  # The interpreted Triton kernels under the all-to-alls and the ring's custom_vjp.
  check(_mesh((2, 2), ("node", "gpu")), "node", "ring", "triton", ulysses_axis_name="gpu",
        dtype=BF16, hq=4, hk=2, d=32, b=1, chunk=16, segments="split", seed=50)


# ------------------------------------------------------ user shard_map, HLO --

def test_ulysses_inside_user_shard_map_with_check_vma():
  # 2-D inside a user's shard_map (check_vma on): specs over cp.sequence_axes.
  mesh = _mesh((2, 2), ("node", "gpu"))
  cp = ContextParallel("node", "ring", ulysses_axis_name="gpu")
  assert cp.sequence_axes == ("node", "gpu")
  q, k, v, dout, _, _ = _inputs(7, b=1, s=64, hq=4, hk=2, d=32, dtype=F32, segments=None)
  spec = P(None, cp.sequence_axes)
  attn = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla", context_parallel=cp)
  fn = jax.shard_map(attn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
  perm = lambda x: ga.zigzag_permute(x, 4)
  w = perm(dout)
  loss = lambda *a: jnp.sum(fn(*a) * w)
  out = ga.zigzag_unpermute(jax.jit(fn)(perm(q), perm(k), perm(v)), 4)
  plain = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla")
  assert_matches("user_2d", out, plain(q, k, v))
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(perm(q), perm(k), perm(v))
  want = jax.grad(lambda *a: jnp.sum(plain(*a) * dout), argnums=(0, 1, 2))(q, k, v)
  for name, g, x in zip("qkv", got, want):
    assert_matches(f"user_2d d{name}", ga.zigzag_unpermute(g, 4), x)


def test_ulysses_communicates_with_all_to_all_only():
  # Forward + backward: q, k, v, out, lse and the three gradients each cross
  # the devices once by all-to-all; nothing is all-gathered (no segment ids).
  mesh = _mesh((4,), ("cp",))
  cp = ContextParallel("cp", "ulysses")

  def local(q, k, v, dout):
    f = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="xla", context_parallel=cp)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(dout)

  spec = P(None, "cp")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))
  sq = jax.ShapeDtypeStruct((1, 64, 4, 32), F32)
  hlo = fn.lower(sq, sq, sq, sq).compile().as_text()
  assert "all-gather" not in hlo and "collective-permute" not in hlo
  assert len(re.findall(r" all-to-all\(", hlo)) >= 6, re.findall(r" all-to-all\(", hlo)


def test_the_spec_names_its_composition():
  # The fields as users write them; .composition says what runs.
  assert ContextParallel("cp").composition == Strategy("allgather", "cp")
  assert ContextParallel(("a", "b"), "ulysses").composition == Strategy("ulysses", ("a", "b"))
  two_d = ContextParallel("node", "ring", ulysses_axis_name=("gpu", "tp")).composition
  assert two_d == TwoD(Strategy("ring", "node"), ("gpu", "tp"))
  assert ContextParallel("node", "ring", ("gpu", "tp")).sequence_axes == ("node", "gpu", "tp")
  assert ContextParallel("cp", "ulysses").sequence_axes == ("cp",)


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="strategy='ulysses' already runs Ulysses"):
    ContextParallel("cp", "ulysses", ulysses_axis_name="gpu")
  with pytest.raises(ValueError, match="must be different mesh axes"):
    ContextParallel(("node", "gpu"), "ring", ulysses_axis_name="gpu")
  with pytest.raises(TypeError, match="ulysses_axis_name"):
    ContextParallel("node", "ring", ulysses_axis_name=3)
  mesh = _mesh((4,), ("cp",))
  q = jnp.zeros((1, 32, 6, 32))   # Hq = 6 over 4 devices
  with pytest.raises(ValueError, match=r"q.shape=\(1, 8, 6, 32\).*Hq=6 must be divisible by 4"):
    ga.context_parallel_attention(q, q, q, mesh, "cp", strategy="ulysses", causal=True,
                                  backend="xla")
  mesh = _mesh((2, 2), ("node", "gpu"))
  with pytest.raises(ValueError, match="divisible by 2 \\* world_size = 8"):
    ga.context_parallel_attention(jnp.zeros((1, 36, 2, 32)), *(jnp.zeros((1, 36, 2, 32)),) * 2,
                                  mesh, "node", ulysses_axis_name="gpu", backend="xla")
  with pytest.raises(ValueError, match="'tp' is not an axis of the mesh"):
    ga.context_parallel_attention(q, q, q, mesh, "node", ulysses_axis_name="tp", backend="xla")


# ------------------------------------------------------------------- GPU --

@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ulysses", "ring+ulysses", "allgather+ulysses"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_multi_gpu_matches_reference(strategy, backend):
  n = jax.device_count()
  if n < 2:
    pytest.skip(f"needs >= 2 GPUs for context parallelism, have {n}")
  world = 2 ** int(np.log2(min(n, 8)))
  kw = dict(dtype=BF16, hq=8, hk=2, d=128, b=2, chunk=256, segments="shared", seed=5,
            config=None)
  if "+" not in strategy:
    check(_mesh((world,), ("cp",)), "cp", strategy, backend, **kw)
    return
  if world < 4:
    pytest.skip(f"2-D context parallelism needs >= 4 GPUs, have {n}")
  check(_mesh((world // 2, 2), ("node", "gpu")), "node", strategy.split("+")[0], backend,
        ulysses_axis_name="gpu", **kw)
