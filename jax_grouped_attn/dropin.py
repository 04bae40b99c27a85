"""``dot_product_attention``: jax.nn.dot_product_attention's signature and results
on this package's kernels.

Same layout ([B, T, N, H], or [T, N, H]), same top-left causal and window
alignment (row i sits at position i: one ``QueryGroup(0, Tq, 0, Tk)``), and the
same values on every row, the ones jax.nn computes specially included:

* a query row beyond ``query_seq_lengths`` gets out = 0;
* a valid row that sees no key (``key_value_seq_lengths`` 0, or a window past
  the keys) gets jax.nn's uniform average over all Tk keys, i.e. the mean of
  ``value`` (jax.nn masks with a large finite negative logit, not -inf);
* ``return_residual``'s log-sum-exp is -0.7 * float32 max for both kinds of row
  (what jax.nn computes there), cast to the input dtype (-inf in float16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn import autodiff, registry, sinks as sinks_lib, validate
from jax_grouped_attn.api import resolve
from jax_grouped_attn.groups import QueryGroup, kv_range

__all__ = ["dot_product_attention"]

# jax.nn's masked logit (``_get_large_negative`` for its float32 logits): a row
# with no visible key has this log-sum-exp (+ log Tk, lost in float32 rounding).
_MASKED_LSE = -0.7 * float(np.finfo(np.float32).max)

_MASK_HINT = (
    "Pass mask=None with is_causal=True (top-left aligned, as in jax.nn), and "
    "express padding with query_seq_lengths / key_value_seq_lengths, local "
    "attention with local_window_size, packed documents with segment ids "
    "through jax_grouped_attn.attention.")


def _as_4d(name, x):
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(
        f"{name}.shape={tuple(x.shape)}: expected [B, T, N, H] or [T, N, H] "
        "(as jax.nn.dot_product_attention).")
  return x[None] if x.ndim == 3 else x


def _seq_lengths(name, lengths, batch):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an integer array of shape (B,) = ({batch},), got shape "
        f"{tuple(lengths.shape)} dtype {lengths.dtype}.")
  return lengths


def _segment_ids(q_lengths, kv_lengths, batch, tq, tk):
  """Segment ids [B, Tq], [B, Tk] for the lengths: valid rows and keys get 0,
  padding rows 1 and padding keys 2, so padding matches nothing."""
  rows = jnp.arange(tq)[None, :]
  keys = jnp.arange(tk)[None, :]
  q_seg = (jnp.zeros((batch, tq), jnp.int32) if q_lengths is None
           else jnp.where(rows < q_lengths[:, None], 0, 1).astype(jnp.int32))
  kv_seg = (jnp.zeros((batch, tk), jnp.int32) if kv_lengths is None
            else jnp.where(keys < kv_lengths[:, None], 0, 2).astype(jnp.int32))
  return q_seg, kv_seg


def _some_row_sees_nothing(tq, tk, causal, window) -> bool:
  """Whether some row (all Tk keys valid) sees no key. Row p sees [max(p -
  left, 0), min(Tk, p + 1 if causal, p + right + 1)): empty only once p - left
  >= Tk, so the rows that see nothing are a suffix and the last row decides."""
  start, end = kv_range(tq - 1, tq - 1, tk, causal, window)
  return end <= start


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False, logits_soft_cap=None,
                          sinks=None, deterministic=True):
  """``jax.nn.dot_product_attention`` on this package's kernels (a drop-in).

  Args:
    query: [B, T, N, H] (or [T, N, H]); key, value: [B, S, K, H] (or [S, K, H]),
      N % K == 0 (GQA/MQA). bfloat16, float16 or float32, one dtype; H a
      multiple of 8 in [8, 256].
    bias: not supported (a flash kernel adds no logit bias): must be None.
    mask: None, or a concrete boolean mask broadcastable to [B, N, T, S] that
      is all True or exactly the top-left causal mask (it then means
      ``is_causal=True``); anything else, and any traced mask, raises.
    scale: None (1/sqrt(H)), a Python float or a concrete scalar array; static
      (a traced scale raises), finite and positive.
    is_causal: top-left aligned causal mask (row i sees keys j <= i).
    query_seq_lengths, key_value_seq_lengths: int arrays [B] (may be traced):
      rows i >= query_seq_lengths[b] give 0, keys j >= key_value_seq_lengths[b]
      are not seen.
    local_window_size: None, an int w (= (w, w)) or (left, right): row i sees
      keys i - left <= j <= i + right (a side None is unbounded).
    implementation: None (= "auto") or a backend name of
      ``jax_grouped_attn.registry.names()`` ("xla", "triton", "pallas", ...).
      "cudnn" is jax.nn's, not one of ours.
    logits_soft_cap: beyond jax.nn: None, or a static float c > 0 capping the
      scores s = scale * q.k to c * tanh(s / c) before masking (Gemma 2).
    sinks: beyond jax.nn: None or [N] floating, one extra logit per query head
      with no value (jax_grouped_attn.grouped_attention). With sinks a row that
      sees no key gives 0 (softmax over the sink alone), not jax.nn's mean of
      value.
    deterministic: beyond jax.nn: True (default) keeps gradients bitwise equal
      run to run; False allows a faster backward whose fp32 adds vary in order
      (jax_grouped_attn.grouped_attention).
    return_residual: also return the log-sum-exp, [B, T, N] (or [T, N]) in
      the input dtype, as jax.nn (no gradient flows through it).

  Returns:
    out shaped like ``query`` (or (out, residual)); every row equals jax.nn's
    (see the module docstring for padding rows and rows that see no key).
  """
  if bias is not None:
    raise ValueError(
        "bias is not supported: a flash kernel adds no logit bias. Pass bias=None "
        "(use jax.nn.dot_product_attention for biased attention), and express "
        "masking with is_causal, query_seq_lengths / key_value_seq_lengths or "
        "local_window_size.")
  if implementation == "cudnn":
    raise ValueError(
        "implementation='cudnn' is jax.nn's cuDNN path, not one of this package's "
        "backends; call jax.nn.dot_product_attention(..., implementation='cudnn') "
        f"for it, or pass implementation= one of {registry.names()} (None = 'auto').")
  if implementation is not None and implementation not in registry.names():
    raise ValueError(
        f"implementation={implementation!r} is unknown; use None (= 'auto') or one of "
        f"{registry.names()}.")
  backend = "auto" if implementation is None else implementation
  out_shape = jnp.shape(query)
  q, k, v = _as_4d("query", query), _as_4d("key", key), _as_4d("value", value)
  b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
  causal = validate.check_bool("is_causal", is_causal)
  return_residual = validate.check_bool("return_residual", return_residual)
  if mask is not None:
    if getattr(mask, "dtype", None) is not None and jnp.dtype(mask.dtype) != jnp.bool_:
      raise ValueError(f"mask must be a boolean array (as in jax.nn), got dtype {mask.dtype}.")
    m = mask if jnp.ndim(mask) >= 4 else jnp.reshape(
        mask, (1,) * (4 - jnp.ndim(mask)) + tuple(jnp.shape(mask)))
    causal = validate.check_dense_mask(m, q.shape, tk, causal, 0, hint=_MASK_HINT)
  q_lengths = _seq_lengths("query_seq_lengths", query_seq_lengths, b)
  kv_lengths = _seq_lengths("key_value_seq_lengths", key_value_seq_lengths, b)
  q_seg = kv_seg = None
  if q_lengths is not None or kv_lengths is not None:
    q_seg, kv_seg = _segment_ids(q_lengths, kv_lengths, b, tq, tk)
  # The one validation of the arrays, scale and window (errors name jax.nn's arguments).
  problem = validate.make_problem(
      q, k, v, (QueryGroup(0, tq, 0, tk),), causal=causal, softmax_scale=scale,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap, names={"softmax_scale": "scale", "causal": "is_causal"})
  window = problem.window
  hq, hk = problem.hq, problem.hk
  kernels = resolve(backend, None, None, "kernel", problem, q.dtype, deterministic)
  sinks = sinks_lib.check_sinks(sinks, hq)
  out, lse = autodiff.differentiable(problem, kernels, q, k, v, q_seg, kv_seg, sinks)

  seen = jnp.isfinite(lse)                                     # [B, N, T]
  if sinks is None and (kv_lengths is not None
                        or _some_row_sees_nothing(tq, tk, causal, window)):
    # jax.nn's rows without a visible key: softmax of equal (masked) logits,
    # the mean of value over all S keys; query padding rows stay 0.
    empty = ~seen
    if q_lengths is not None:
      empty = empty & (jnp.arange(tq)[None, None, :] < q_lengths[:, None, None])
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1)            # [B, K, H]
    mean_v = jnp.repeat(mean_v, hq // hk, axis=1).astype(out.dtype)   # [B, N, H]
    out = jnp.where(jnp.moveaxis(empty, 1, 2)[..., None], mean_v[:, None], out)
  out = out.reshape(out_shape[:-1] + out.shape[-1:])   # [.., Dv]: v's head_dim
  if not return_residual:
    return out
  residual = jnp.where(seen, lse, jnp.float32(_MASKED_LSE))
  residual = jax.lax.stop_gradient(jnp.moveaxis(residual, 1, 2).astype(q.dtype))
  return out, residual.reshape(out_shape[:-1])
