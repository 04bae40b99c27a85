"""Public entry points: grouped_attention, attention, segment_ids_from_cu_seqlens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn import autodiff
from jax_grouped_attn.config import as_attention_config
from jax_grouped_attn.groups import QueryGroup, normalize_groups
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.platform import resolve_backend
from jax_grouped_attn.reference import reference_attention

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256


def _check_array(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be a jax/numpy array, got {type(x).__name__}.")
  if x.ndim != 4:
    raise ValueError(
        f"{name}.shape={tuple(x.shape)} has rank {x.ndim}; expected rank 4 "
        "[batch, seq, heads, head_dim].")


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_array(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
        f"q, k, v must share one dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}; "
        "cast them first (out has q's dtype).")
  if q.dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(f"{q.dtype=} is not supported; use bfloat16, float16 or float32.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape=}, {v.shape=}.")
  b, tq, hq, d = q.shape
  _, tk, hk, dk = k.shape
  if k.shape[0] != b:
    raise ValueError(f"batch mismatch: {q.shape=} but {k.shape=} (axis 0 is batch).")
  if dk != d:
    raise ValueError(f"head_dim mismatch: {q.shape=} but {k.shape=} (axis 3 is head_dim).")
  if d % 8 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
    raise ValueError(
        f"head_dim={d} (q.shape[3]) is not supported: it must be a multiple of 8 "
        f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}].")
  if hk == 0 or hq % hk:
    raise ValueError(
        f"q heads Hq={hq} must be a multiple of kv heads Hk={hk} (GQA/MQA): "
        f"{q.shape=}, {k.shape=}.")
  if min(b, tq, tk) < 1:
    raise ValueError(f"empty input: {q.shape=}, {k.shape=}; batch and sequence "
                     "lengths must be >= 1.")


def _check_segment_ids(name, ids, batch, length, axis_name):
  if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
    raise TypeError(f"{name} must be an integer array, got {type(ids).__name__}.")
  if tuple(ids.shape) != (batch, length):
    raise ValueError(
        f"{name}.shape={tuple(ids.shape)} must be (batch, {axis_name}) = "
        f"({batch}, {length}).")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name}.dtype={ids.dtype} must be an integer dtype.")


def _check_scale(softmax_scale, d):
  if softmax_scale is None:
    return 1.0 / math.sqrt(d)
  if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
    raise TypeError(
        f"softmax_scale must be None or a Python float (static), got "
        f"{type(softmax_scale).__name__}.")
  scale = float(softmax_scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"softmax_scale={softmax_scale!r} must be a finite positive number.")
  return scale


def _check_bool(name, value):
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}.")
  return bool(value)


def grouped_attention(q, k, v, groups, *, causal=True, softmax_scale=None,
                      q_segment_ids=None, kv_segment_ids=None, backend="auto",
                      return_lse=False, config=None, interpret=None,
                      backward="kernel"):
  """Attention of several query groups to one shared K,V, in one kernel launch.

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hk, D]; Hq % Hk == 0 (query head h reads
      kv head h // (Hq // Hk)). bfloat16, float16 or float32; D a multiple of
      8 in [32, 256].
    groups: QueryGroup(q_start, q_len, q_pos, kv_len)s partitioning q's rows.
      Row q_start + i sees keys j < kv_len with, if ``causal``, j <= q_pos + i
      (the mask is drawn in ``jax_grouped_attn.groups``).
    q_segment_ids: [B, Tq] int, kv_segment_ids: [B, Tk] int: a key is seen
      only if its segment id equals the row's (both or neither).
    softmax_scale: static float, default 1/sqrt(D).
    backend: "auto" | "xla" | "pallas" | "triton" (see README).
    return_lse: also return the float32 natural-log log-sum-exp [B, Hq, Tq].
    config: None, ForwardConfig, BackwardConfig or AttentionConfig.
    interpret: None (interpret only without a GPU) or a bool override.
    backward: "kernel" (the backend's backward kernels) or "reference" (the
      reference's autodiff; for isolating kernel bugs).

  Returns:
    out [B, Tq, Hq, D] in q's dtype, or (out, lse). A row that sees no key
    gets out = 0 and lse = -inf.
  """
  _check_qkv(q, k, v)
  b, tq, hq, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  groups = normalize_groups(groups, tq, tk)
  causal = _check_bool("causal", causal)
  return_lse = _check_bool("return_lse", return_lse)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(
        "pass both q_segment_ids and kv_segment_ids or neither "
        f"(got q_segment_ids={'None' if q_segment_ids is None else 'array'}, "
        f"kv_segment_ids={'None' if kv_segment_ids is None else 'array'}).")
  if q_segment_ids is not None:
    _check_segment_ids("q_segment_ids", q_segment_ids, b, tq, "Tq")
    _check_segment_ids("kv_segment_ids", kv_segment_ids, b, tk, "Tk")
  scale = _check_scale(softmax_scale, d)
  cfg = as_attention_config(config)
  if backward not in autodiff.BACKWARD_MODES:
    raise ValueError(f"backward={backward!r} is unknown; use one of {autodiff.BACKWARD_MODES}.")
  name, interp = resolve_backend(backend, interpret)
  problem = Problem(groups, b, tq, tk, hq, hk, d, causal, scale,
                    q_segment_ids is not None)
  if name == "xla":
    out, lse = reference_attention(problem, q, k, v, q_segment_ids, kv_segment_ids)
  else:
    out, lse = autodiff.kernel_attention(problem, name, cfg, interp, backward,
                                         q, k, v, q_segment_ids, kv_segment_ids)
  return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, softmax_scale=None, segment_ids=None,
              q_segment_ids=None, kv_segment_ids=None, backend="auto",
              return_lse=False, config=None, interpret=None, backward="kernel",
              context_parallel=None):
  """Standard attention, a drop-in for ``jax.nn.dot_product_attention``.

  One group ``QueryGroup(0, Tq, Tk - Tq, Tk)``: with ``causal`` and Tq != Tk
  the mask is bottom-right aligned (the last query row sees every key)::

      Tq=3, Tk=5, causal     key: 0 1 2 3 4
                        row 0     x x x . .
                        row 1     x x x x .
                        row 2     x x x x x

  ``segment_ids`` [B, T] is the self-attention shortcut (Tq == Tk) for
  ``q_segment_ids = kv_segment_ids = segment_ids``. Other arguments as in
  :func:`grouped_attention`.

  ``context_parallel=ContextParallel(axis_name, strategy)``: inside
  ``jax.shard_map``, q, k, v (and segment ids) are this device's zigzag shards
  of one sequence sharded over ``axis_name`` (see ``jax_grouped_attn.parallel``);
  the result is this device's shard of the exact full-sequence attention.
  """
  for name, x in (("q", q), ("k", k)):
    _check_array(name, x)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    if q.shape[1] != k.shape[1]:
      raise ValueError(
          f"segment_ids is for self-attention (Tq == Tk) but {q.shape=}, "
          f"{k.shape=}; pass q_segment_ids and kv_segment_ids instead.")
    q_segment_ids = kv_segment_ids = segment_ids
  if context_parallel is not None:
    return _context_parallel_attention(
        q, k, v, context_parallel, causal=causal, softmax_scale=softmax_scale,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        backend=backend, return_lse=return_lse, config=config,
        interpret=interpret, backward=backward)
  tq, tk = q.shape[1], k.shape[1]
  group = QueryGroup(0, tq, tk - tq, tk)
  return grouped_attention(
      q, k, v, (group,), causal=causal, softmax_scale=softmax_scale,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      backend=backend, return_lse=return_lse, config=config,
      interpret=interpret, backward=backward)


def _context_parallel_attention(q, k, v, cp, *, causal, softmax_scale, q_segment_ids,
                                kv_segment_ids, backend, return_lse, config,
                                interpret, backward):
  """Validates like :func:`grouped_attention`, then runs ``parallel``."""
  from jax_grouped_attn import parallel
  if not isinstance(cp, parallel.ContextParallel):
    raise TypeError(
        f"context_parallel must be None or a ContextParallel, got {cp!r}.")
  _check_qkv(q, k, v)
  b, t, _, d = q.shape
  causal = _check_bool("causal", causal)
  return_lse = _check_bool("return_lse", return_lse)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids or neither.")
  if q_segment_ids is not None:
    _check_segment_ids("q_segment_ids", q_segment_ids, b, t, "Tq")
    _check_segment_ids("kv_segment_ids", kv_segment_ids, b, k.shape[1], "Tk")
  scale = _check_scale(softmax_scale, d)
  cfg = as_attention_config(config)
  if backward not in autodiff.BACKWARD_MODES:
    raise ValueError(f"backward={backward!r} is unknown; use one of {autodiff.BACKWARD_MODES}.")
  name, interp = resolve_backend(backend, interpret)
  out, lse = parallel.local_attention(
      q, k, v, cp, causal=causal, scale=scale, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, backend=name, interpret=interp, config=cfg,
      backward=backward)
  return (out, lse) if return_lse else out


def segment_ids_from_cu_seqlens(cu_seqlens, total_len: int):
  """flash-attn varlen ``cu_seqlens`` [n+1] (or [B, n+1]) -> segment ids [total_len] (or [B, total_len]).

  Token t belongs to document i when cu_seqlens[i] <= t < cu_seqlens[i+1]. The
  padding tail t >= cu_seqlens[-1] gets id n, which matches no real document.
  """
  if isinstance(total_len, bool) or not isinstance(total_len, (int, np.integer)) or total_len < 1:
    raise ValueError(f"total_len must be a positive int, got {total_len!r}.")
  cu = jnp.asarray(cu_seqlens)
  if cu.ndim not in (1, 2) or cu.shape[-1] < 2 or not jnp.issubdtype(cu.dtype, jnp.integer):
    raise ValueError(
        f"cu_seqlens must be an integer array of shape [n+1] or [B, n+1] with "
        f"n >= 1, got shape {tuple(cu.shape)} dtype {cu.dtype}.")
  if not isinstance(cu_seqlens, jax.core.Tracer):
    c = np.asarray(cu_seqlens)
    if (c[..., 0] != 0).any() or (np.diff(c, axis=-1) < 0).any() or (c[..., -1] > total_len).any():
      raise ValueError(
          "cu_seqlens must start at 0, be non-decreasing and end at or before "
          f"{total_len=}; got {c.tolist()}.")
  t = jnp.arange(total_len)
  search = lambda c: jnp.searchsorted(c[1:], t, side="right")
  ids = search(cu) if cu.ndim == 1 else jax.vmap(search)(cu)
  return ids.astype(jnp.int32)
