"""Flax integration: jax_grouped_attn.flax.make_attention_fn in linen and nnx
attention modules, and the Llama benchmark model (benchmarks/llama.py)."""

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")
from flax import linen as nn, nnx

from jax_grouped_attn.flax import make_attention_fn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import llama  # noqa: E402

BACKENDS = ["xla", "pallas"]
TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)


def backward_mode(backend):
  """"kernel" where the backend has backward kernels, else "reference"."""
  del backend  # every registry entry has a backward
  return "kernel"


def attn_fn(backend, causal=True, **kw):
  return make_attention_fn(causal=causal, backend=backend,
                           backward=backward_mode(backend), **kw)


def assert_trees_close(a, b, **tol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def causal_mask(b, t):
  return nn.make_causal_mask(jnp.ones((b, t)))


# ------------------------------------------------------------------ linen ---

@pytest.mark.parametrize("backend", BACKENDS)
def test_linen_matches_flax_causal(backend):
  b, t, heads, d = 2, 24, 2, 32
  x = jax.random.normal(jax.random.key(0), (b, t, 48))
  mask = causal_mask(b, t)
  ref = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=heads * d)
  ours = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=heads * d,
                                         attention_fn=attn_fn(backend))
  params = ref.init(jax.random.key(1), x)

  def loss(module, p, x, **kw):
    y = module.apply(p, x, **kw)
    return jnp.sum(y * jnp.cos(y)), y

  (l_ref, y_ref), g_ref = jax.value_and_grad(
      lambda p, x: loss(ref, p, x, mask=mask), argnums=(0, 1), has_aux=True)(params, x)
  (l, y), g = jax.jit(jax.value_and_grad(
      lambda p, x: loss(ours, p, x), argnums=(0, 1), has_aux=True))(params, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(l, l_ref, **GRAD_TOL)
  assert_trees_close(g, g_ref, **GRAD_TOL)
  # A concrete causal mask is recognised (outside jit).
  np.testing.assert_allclose(ours.apply(params, x, mask=mask), y_ref, **TOL)


# -------------------------------------------------------------------- nnx ---

def _nnx_mha(attention_fn=None, **kw):
  extra = {} if attention_fn is None else {"attention_fn": attention_fn}
  return nnx.MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=48,
                                qkv_features=128, decode=False,
                                rngs=nnx.Rngs(0), **extra, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nnx_matches_flax_causal_gqa(backend):
  b, t = 2, 32
  x = jax.random.normal(jax.random.key(2), (b, t, 48))
  mask = causal_mask(b, t)
  ref, ours = _nnx_mha(), _nnx_mha(attn_fn(backend))   # same seed, same params

  def loss(m, x, **kw):
    y = m(x, **kw)
    return jnp.sum(y * jnp.cos(y)), y

  (l_ref, y_ref), (g_ref, gx_ref) = nnx.value_and_grad(
      lambda m, x: loss(m, x, mask=mask), argnums=(0, 1), has_aux=True)(ref, x)
  step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (l, y), (g, gx) = step(ours, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(l, l_ref, **GRAD_TOL)
  np.testing.assert_allclose(gx, gx_ref, **GRAD_TOL)
  assert_trees_close(nnx.state(g, nnx.Param), nnx.state(g_ref, nnx.Param), **GRAD_TOL)


def test_nnx_is_causal_and_noncausal():
  x = jax.random.normal(jax.random.key(3), (2, 16, 48))
  ref = _nnx_mha()
  # is_causal=True on a non-causal attention_fn turns causal masking on.
  ours = _nnx_mha(make_attention_fn(causal=False, backend="xla"))
  np.testing.assert_allclose(ours(x, is_causal=True), ref(x, mask=causal_mask(2, 16)), **TOL)
  np.testing.assert_allclose(ours(x), ref(x), **TOL)
  np.testing.assert_allclose(ours(x, mask=jnp.ones((2, 1, 16, 16))), ref(x), **TOL)


def test_batch_axes_dtype_and_cross_attention():
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (2, 3, 8, 4, 32))       # two batch axes
  k = jax.random.normal(ks[1], (2, 3, 12, 2, 32))      # Tk > Tq, GQA
  v = jax.random.normal(ks[2], (2, 3, 12, 2, 32))
  fn = make_attention_fn(causal=True, backend="xla")
  rows = np.arange(8)[:, None] + 4 >= np.arange(12)[None, :]   # bottom-right
  flat = lambda a: a.reshape(6, *a.shape[2:])
  ref = jax.nn.dot_product_attention(flat(q), flat(k), flat(v),
                                     mask=jnp.asarray(rows)[None, None])
  ref = ref.reshape(q.shape)
  np.testing.assert_allclose(fn(q, k, v), ref, **TOL)
  np.testing.assert_allclose(fn(q[0, 0], k[0, 0], v[0, 0]), ref[0, 0], **TOL)  # no batch
  out = fn(q, k, v, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)
  # inactive dropout is accepted
  fn(q, k, v, dropout_rate=0.1, deterministic=True, dropout_rng=jax.random.key(0))


# ----------------------------------------------------------- sliding window --

def window_mask(b, t, left, right=0):
  """Dense [b, 1, t, t] mask of a (left, right) window, causal when right == 0."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  return jnp.asarray(np.broadcast_to((j >= i - left) & (j <= i + right), (b, 1, t, t)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_in_linen_and_nnx(backend):
  """make_attention_fn(local_window_size=...) equals Flax's own attention under
  the dense window mask, forward and gradients (linen) and in nnx (GQA)."""
  b, t = 2, 24
  x = jax.random.normal(jax.random.key(5), (b, t, 48))
  mask = window_mask(b, t, 5)
  fn = attn_fn(backend, causal=True, local_window_size=(5, 0))
  ref = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=64)
  ours = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=64, attention_fn=fn)
  params = ref.init(jax.random.key(6), x)
  loss = lambda m, p, x, **kw: jnp.sum(jnp.sin(m.apply(p, x, **kw)))
  g_ref = jax.grad(lambda p, x: loss(ref, p, x, mask=mask), argnums=(0, 1))(params, x)
  g = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x, mask=mask), **TOL)
  assert_trees_close(g, g_ref, **GRAD_TOL)
  # Not the plain causal result: the window matters here.
  assert not np.allclose(ours.apply(params, x), ref.apply(params, x, mask=causal_mask(b, t)),
                         atol=1e-3)
  # nnx: a two-sided window on a non-causal function.
  m_ref, m = _nnx_mha(), _nnx_mha(attn_fn(backend, causal=False, local_window_size=(3, 2)))
  np.testing.assert_allclose(m(x), m_ref(x, mask=window_mask(b, t, 3, 2)), **TOL)


def test_window_per_call_and_errors():
  """local_window_size per call (jax.nn's meaning) overrides the function's; a
  bad window raises when the function is made."""
  ks = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(kk, (2, 16, 2, 32)) for kk in ks)
  fn = make_attention_fn(causal=False, backend="xla", local_window_size=1)
  for w in (3, (2, 4)):
    want = jax.nn.dot_product_attention(q, k, v, local_window_size=w)
    np.testing.assert_allclose(fn(q, k, v, local_window_size=w), want, **TOL)
  np.testing.assert_allclose(fn(q, k, v), jax.nn.dot_product_attention(
      q, k, v, local_window_size=1), **TOL)
  with pytest.raises(ValueError, match="local_window_size"):
    make_attention_fn(local_window_size=-2)
  with pytest.raises(TypeError, match="local_window_size"):
    make_attention_fn(local_window_size=(1, 2, 3))


# ----------------------------------------------------- unsupported inputs ---

def _qkv(t=8, tk=None):
  q = jnp.ones((1, t, 2, 32))
  kv = jnp.ones((1, tk or t, 2, 32))
  return q, kv, kv


@pytest.mark.parametrize("kwargs, name", [
    (dict(bias=jnp.zeros((1, 2, 8, 8))), "bias"),
    (dict(dropout_rate=0.1, deterministic=False), "dropout_rate"),
    (dict(precision=jax.lax.Precision.HIGHEST), "precision"),
    (dict(module=object()), "module"),
    (dict(qk_attn_weights_einsum=jnp.einsum), "qk_attn_weights_einsum"),
    (dict(mask=jnp.asarray(np.random.default_rng(0).random((1, 1, 8, 8)) > 0.5)), "mask"),
    (dict(mask=jnp.ones((1, 1, 8, 7))), "mask"),
    (dict(unknown_arg=1), "unknown_arg"),
])
def test_unsupported_arguments_raise(kwargs, name):
  fn = make_attention_fn(causal=True, backend="xla")
  with pytest.raises(ValueError, match=name):
    fn(*_qkv(), **kwargs)


def test_unsupported_masks_raise():
  fn = make_attention_fn(causal=False, backend="xla")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="mask is a traced array"):   # traced mask
    jax.jit(lambda q, k, v: fn(q, k, v, mask=causal_mask(1, 8)))(q, k, v)
  with pytest.raises(ValueError, match="is_causal"):               # Tq != Tk
    fn(*_qkv(4, 8), is_causal=True)
  pad = jnp.ones((1, 1, 8, 8)).at[..., 6:].set(0)                 # padding mask
  with pytest.raises(ValueError, match="neither all-True nor exactly"):
    fn(q, k, v, mask=pad)
  top_left = jnp.tril(jnp.ones((4, 8)))[None, None]               # wrong alignment
  with pytest.raises(ValueError, match="mask"):
    fn(*_qkv(4, 8), mask=top_left)
  with pytest.raises(ValueError, match="sow"):                      # sow_weights
    m = _nnx_mha(make_attention_fn(causal=True, backend="xla"))
    m(jnp.ones((1, 8, 48)), sow_weights=True)


def test_import_error_without_flax(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)
  monkeypatch.delitem(sys.modules, "jax_grouped_attn.flax")
  with pytest.raises(ImportError, match=r"pip install 'jax_grouped_attn\[flax\]'"):
    importlib.import_module("jax_grouped_attn.flax")


# ------------------------------------------------------------------ llama ---

CFG = llama.PRESETS["tiny"]
B, S = 2, 32


def _batch(seed=0):
  return llama.synthetic_batch(jax.random.key(seed), B, S, CFG.vocab_size)


def _train(grad_fn, params, batches, positions):
  """(loss, grads) at each batch, taking an AdamW step after each."""
  tx = llama.make_optimizer(1e-2)
  step = llama.make_train_step(grad_fn, tx, return_grads=True)
  params = jax.tree.map(jnp.copy, params)   # the step donates its inputs
  opt_state, out = tx.init(params), []
  for tokens, targets in batches:
    params, opt_state, loss, grads = step(params, opt_state, tokens, targets, positions)
    out.append((loss, grads))
  return out


def test_llama_scan_stacks_layers():
  graphdef, params = llama.build(CFG)
  model = nnx.merge(graphdef, params)
  assert model.layers.attn.wq.kernel.shape == (CFG.n_layers, CFG.dim, CFG.dim)
  tokens, _ = _batch()
  fn = make_attention_fn(causal=True, backend="xla")
  logits = nnx.jit(lambda m, t: m(t, jnp.arange(S), fn))(model, tokens)
  assert logits.shape == (B, S, CFG.vocab_size) and logits.dtype == jnp.float32


@pytest.fixture(scope="module")
def llama_reference():
  graphdef, params = llama.build(CFG)
  grad_fn = llama.make_grad_fn(graphdef, make_attention_fn(causal=True, backend="xla"))
  batches = [_batch(0), _batch(1)]
  return graphdef, params, batches, _train(grad_fn, params, batches, jnp.arange(S))


def test_llama_pallas_matches_reference(llama_reference):
  graphdef, params, batches, ref = llama_reference
  grad_fn = llama.make_grad_fn(graphdef, attn_fn("pallas"))
  got = _train(grad_fn, params, batches, jnp.arange(S))
  for (l, g), (l_ref, g_ref) in zip(got, ref):
    np.testing.assert_allclose(l, l_ref, **GRAD_TOL)
    assert_trees_close(g, g_ref, **GRAD_TOL)


@pytest.mark.parametrize("dp, cp, strategy, backend", [
    (1, 4, "ring", "xla"),
    (2, 2, "allgather", "pallas"),
])
def test_llama_context_parallel_matches_single_device(llama_reference, dp, cp, strategy,
                                                      backend):
  if jax.device_count() < dp * cp:
    pytest.skip(f"needs {dp * cp} devices")
  graphdef, params, batches, ref = llama_reference
  mesh = llama.make_cp_mesh(cp, dp)
  attn = attn_fn(backend, context_parallel=llama.context_parallel_spec("cp", strategy))
  grad_fn = llama.make_cp_grad_fn(graphdef, attn, mesh, B * S)
  zz = [llama.to_zigzag(tokens, targets, cp) for tokens, targets in batches]
  positions = zz[0][2]
  got = _train(grad_fn, params, [z[:2] for z in zz], positions)
  for (l, g), (l_ref, g_ref) in zip(got, ref):
    np.testing.assert_allclose(l, l_ref, **GRAD_TOL)
    assert_trees_close(g, g_ref, **GRAD_TOL)


@pytest.mark.parametrize("extra", [[], ["--context-parallel", "2", "--data-parallel", "1"]],
                         ids=["single", "cp2"])
def test_llama_cli_smoke(capsys, extra):
  llama.main(["--preset", "tiny", "--backend", "xla", "--seq", "32", "--batch", "2",
              "--steps", "2", "--warmup", "1", *extra])
  out = capsys.readouterr().out
  assert "tokens/s" in out and "step time" in out
