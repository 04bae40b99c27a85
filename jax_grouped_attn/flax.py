"""Flax integration: an ``attention_fn`` for Flax's attention modules.

``make_attention_fn(...)`` returns a callable with the signature that
``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` and
``flax.nnx.MultiHeadAttention(attention_fn=...)`` call. Masking rule:

* ``mask=None``: causal if ``make_attention_fn(causal=True)`` (bottom-right
  aligned when Tq != Tk) or nnx's ``is_causal=True`` (Flax aligns it
  top-left, so it needs Tq == Tk); otherwise every key is seen.
* a concrete (not traced) ``mask``: accepted only if ``mask AND causal`` is
  exactly the causal mask or all True; the function then runs causal or not.
* a traced ``mask`` (e.g. ``nn.make_causal_mask`` inside ``jax.jit``) cannot be
  checked and raises: pass ``mask=None`` and ``make_attention_fn(causal=True)``.

Sliding windows: Flax 0.12's modules pass no window, so it is set on the
function, ``make_attention_fn(local_window_size=...)`` (jax.nn's meaning: an int
w or (left, right)); a caller that invokes the function itself may also pass
``local_window_size=`` per call. Positions are those of
:func:`jax_grouped_attn.attention` (row i at Tk - Tq + i; the same as Flax's
when Tq == Tk).

Everything a flash kernel cannot express (``bias``, dropout that is active,
``precision`` other than default, sown attention weights, custom einsums)
raises a ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

try:
  import flax  # noqa: F401
except ImportError as e:
  raise ImportError(
      "jax_grouped_attn.flax needs Flax, which is not installed; install it "
      "with `pip install 'jax_grouped_attn[flax]'` (or `pip install flax`).") from e

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn import validate
from jax_grouped_attn.api import attention

__all__ = ["FlaxAttentionFn", "make_attention_fn"]

_DEFAULT_PRECISIONS = (None, "default", "DEFAULT", jax.lax.Precision.DEFAULT)


def _unsupported(name: str, why: str) -> ValueError:
  return ValueError(f"jax_grouped_attn attention_fn: {name} {why}")


_MASK_HINT = (
    "Pass mask=None and build the function with make_attention_fn(causal=True) "
    "(nnx: or call the module with is_causal=True); express padding or packed "
    "documents with segment_ids through jax_grouped_attn.attention.")


def _mask_is_causal(mask, q_shape, tk: int, causal: bool) -> bool:
  """Reads a concrete mask: True if ``mask AND causal`` is the (bottom-right
  aligned) causal mask, False if it is all True; raises otherwise."""
  return validate.check_dense_mask(mask, q_shape, tk, causal, tk - q_shape[-3],
                                   hint=_MASK_HINT, prefix="jax_grouped_attn attention_fn: ")


def _promote(q, k, v, dtype):
  dtype = jnp.result_type(q, k, v) if dtype is None else jnp.dtype(dtype)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@dataclasses.dataclass(frozen=True)
class FlaxAttentionFn:
  """Flax ``attention_fn`` running :func:`jax_grouped_attn.attention`.

  Build it with :func:`make_attention_fn`. Inputs are
  ``[batch..., length, heads, head_dim]`` (any number of batch axes, also
  none); key/value may have fewer heads (GQA).
  """

  causal: bool = False
  backend: str = "auto"
  context_parallel: Any = None
  softmax_scale: float | None = None
  config: Any = None
  interpret: bool | None = None
  backward: str = "kernel"
  local_window_size: Any = None
  logits_soft_cap: float | None = None
  sinks: Any = None
  deterministic_backward: bool = True

  def __call__(self, query, key, value, bias=None, mask=None,
               broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
               deterministic=False, dtype=None, precision=None, module=None,
               is_causal=False, force_fp32_for_softmax=False,
               qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
               promote_dtype=None, local_window_size=None, **kwargs):
    """Flax's attention_fn call; returns [batch..., Tq, heads, head_dim].

    Mapped: ``dtype`` (inputs cast to it; else promoted to a common dtype, or
    by ``promote_dtype`` when given), ``mask`` and ``is_causal`` (module
    docstring), dropout when ``deterministic`` or ``dropout_rate == 0`` (a
    no-op), ``precision`` None/DEFAULT, ``force_fp32_for_softmax`` (always
    fp32), ``local_window_size`` (None: the function's own). Raised as
    ValueError: ``bias``, active dropout, other ``precision``, ``module``
    (sow_weights), custom einsums, and unknown keyword arguments that are not
    None/False.
    """
    del broadcast_dropout, dropout_rng  # only meaningful with active dropout
    del force_fp32_for_softmax          # the softmax is always fp32 here
    for name, value_ in sorted(kwargs.items()):
      if value_ is not None and value_ is not False:
        raise _unsupported(name, f"={value_!r} is not supported (unknown "
                           "argument; only None/False is accepted).")
    if bias is not None:
      raise _unsupported("bias", "is not supported: a flash kernel takes no "
                         "additive logit bias. Pass bias=None.")
    if dropout_rate and not deterministic:
      raise _unsupported(
          "dropout_rate", f"={dropout_rate} with deterministic=False is not "
          "supported: the kernels have no attention dropout. Use "
          "dropout_rate=0.0 or deterministic=True.")
    if precision not in _DEFAULT_PRECISIONS:
      raise _unsupported(
          "precision", f"={precision!r} is not supported: the kernels fix "
          "their own precision (fp32 accumulation). Pass precision=None.")
    if module is not None:
      raise _unsupported(
          "module", "is not None (sow_weights=True): the attention weights "
          "are never materialised, so they cannot be sown.")
    for name, fn in (("qk_attn_weights_einsum", qk_attn_weights_einsum),
                     ("attn_weights_value_einsum", attn_weights_value_einsum)):
      if fn is not None:
        raise _unsupported(name, "is not supported: the kernels do their own "
                           "matmuls. Leave it None.")
    for name, x in (("query", query), ("key", key), ("value", value)):
      if getattr(x, "ndim", 0) < 3:
        raise _unsupported(name, f"has shape {getattr(x, 'shape', None)}; "
                           "expected [batch..., length, heads, head_dim].")
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
      raise _unsupported(
          "query", f"batch axes {query.shape[:-3]} differ from key's "
          f"{key.shape[:-3]} or value's {value.shape[:-3]}.")
    q_shape = query.shape
    tq, tk = q_shape[-3], key.shape[-3]
    causal = bool(self.causal)
    if is_causal:
      if tq != tk:
        raise _unsupported(
            "is_causal", f"=True with Tq={tq} != Tk={tk}: Flax aligns that mask "
            "top-left, this package bottom-right. Use "
            "make_attention_fn(causal=True) for bottom-right alignment.")
      causal = True
    if mask is not None:
      causal = _mask_is_causal(mask, q_shape, tk, causal)
    if promote_dtype is None:
      q, k, v = _promote(query, key, value, dtype)
    else:
      q, k, v = promote_dtype((query, key, value), dtype=dtype)
    batch = q_shape[:-3]
    n = math.prod(batch)
    q = q.reshape(n, *q.shape[-3:])
    k = k.reshape(n, *k.shape[-3:])
    v = v.reshape(n, *v.shape[-3:])
    extra = {}
    if self.context_parallel is not None:
      extra["context_parallel"] = self.context_parallel
    if local_window_size is None:
      local_window_size = self.local_window_size
    out = attention(q, k, v, causal=causal, softmax_scale=self.softmax_scale,
                    backend=self.backend, config=self.config,
                    interpret=self.interpret, backward=self.backward,
                    local_window_size=local_window_size,
                    logits_soft_cap=self.logits_soft_cap, sinks=self.sinks,
                    deterministic=self.deterministic_backward, **extra)
    return out.reshape(*batch, *out.shape[1:])


def make_attention_fn(causal: bool = False, backend: str = "auto", *,
                      context_parallel=None, softmax_scale: float | None = None,
                      config=None, interpret: bool | None = None,
                      backward: str = "kernel",
                      local_window_size=None, logits_soft_cap=None,
                      sinks=None, deterministic: bool = True) -> FlaxAttentionFn:
  """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention``.

  Args:
    causal: causal masking (bottom-right aligned when Tq != Tk), used when the
      module passes ``mask=None``; see the module docstring for masks.
    backend, softmax_scale, config, interpret, backward, local_window_size,
      logits_soft_cap: as in :func:`jax_grouped_attn.attention` (the window and
      the cap are checked here).
    sinks: None or [heads] floating, as in :func:`jax_grouped_attn.attention`. To
      learn them, make the function inside the module's call from a parameter.
    context_parallel: None, or a ``ContextParallel`` passed to
      :func:`jax_grouped_attn.attention` (inputs are then the local shards).
    deterministic: as in :func:`jax_grouped_attn.attention` (False: a faster
      backward whose fp32 adds vary in order). Not Flax's per-call
      ``deterministic``, which is about dropout.
  """
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}.")
  window = validate.check_window(local_window_size, False)
  softcap = validate.check_softcap(logits_soft_cap)
  deterministic = validate.check_bool("deterministic", deterministic)
  return FlaxAttentionFn(causal=bool(causal), backend=backend,
                         context_parallel=context_parallel,
                         softmax_scale=softmax_scale, config=config,
                         interpret=interpret, backward=backward,
                         local_window_size=window, logits_soft_cap=softcap, sinks=sinks,
                         deterministic_backward=deterministic)
