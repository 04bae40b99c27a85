"""Public entry points: grouped_attention, attention, context_parallel_attention,
segment_ids_from_cu_seqlens.

Each validates its arguments once into a ``Problem`` and resolves the kernel
choice once into a ``call.Kernels``; the layers below take those two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn import autodiff, cp, registry, sinks as sinks_lib, validate
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.config import as_attention_config
from jax_grouped_attn.cp.global_arrays import global_attention
from jax_grouped_attn.groups import QueryGroup

# Kept for callers that read the limits from here.
SUPPORTED_DTYPES = validate.SUPPORTED_DTYPES
MIN_HEAD_DIM, MAX_HEAD_DIM = validate.MIN_HEAD_DIM, validate.MAX_HEAD_DIM


def resolve(backend, interpret, config, backward, problem, dtype, deterministic=True) -> Kernels:
  """The kernel choice of one call, checked: entries per pass, config, interpret,
  mode, determinism."""
  cfg = as_attention_config(config)
  mode = validate.check_backward_mode(backward)
  deterministic = validate.check_bool("deterministic", deterministic)
  entries, interp = registry.resolve(backend, interpret, cfg, problem, dtype)
  registry.check_config(entries, cfg, deterministic)
  return Kernels(entries[0].name, entries[1].name, cfg, interp, mode, deterministic)


def grouped_attention(q, k, v, groups, *, causal=True, softmax_scale=None,
                      q_segment_ids=None, kv_segment_ids=None, backend="auto",
                      return_lse=False, config=None, interpret=None,
                      backward="kernel", local_window_size=None, logits_soft_cap=None,
                      sinks=None, deterministic=True):
  """Attention of several query groups to one shared K,V, in one kernel launch.

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hk, D]; Hq % Hk == 0 (query head h reads
      kv head h // (Hq // Hk)). bfloat16, float16 or float32; D a multiple of
      8 in [8, 256].
    groups: QueryGroup(q_start, q_len, q_pos, kv_len)s partitioning q's rows.
      Row q_start + i sees keys j < kv_len with, if ``causal``, j <= q_pos + i
      (the mask is drawn in ``jax_grouped_attn.groups``).
    q_segment_ids: [B, Tq] int, kv_segment_ids: [B, Tk] int: a key is seen
      only if its segment id equals the row's (both or neither).
    local_window_size: sliding window, as in jax.nn: None, an int w (= (w, w))
      or (left, right), a side None for unbounded; the row at position p then
      sees only keys j with p - left <= j <= p + right. Kernels skip the kv
      blocks outside the window (cost ~ Tq x window).
    logits_soft_cap: None, or a static float c > 0: the scores s = scale * q.k
      become c * tanh(s / c) before masking (Gemma 2). Backends "xla",
      "triton" and "pallas_triton" ("auto" and "pallas" pick one of them).
    sinks: None, or [Hq] floating (learned, differentiable; gpt-oss): each query
      head's softmax gets one extra logit sinks[h] with no value vector. The
      returned lse includes it; a row that sees no key gets out 0 and lse
      sinks[h]. Every backend and context-parallel strategy (applied once, to
      the finished attention: jax_grouped_attn/sinks.py).
    softmax_scale: static: a Python float or a concrete scalar (a traced one
      raises), default 1/sqrt(D).
    backend: "auto" | "xla" | "pallas" | "triton" (see README).
    return_lse: also return the float32 natural-log log-sum-exp [B, Hq, Tq].
    config: None, ForwardConfig, BackwardConfig or AttentionConfig.
    interpret: None (interpret only without a GPU) or a bool override.
    backward: "kernel" (the backend's backward kernels) or "reference" (the
      reference's autodiff; for isolating kernel bugs).
    deterministic: True (default): gradients are bitwise equal run to run.
      False allows a faster backward whose fp32 dQ adds run in a varying order
      (pallas_mosaic's fused backward, at q/k head_dim <= 128 and v's <= 128;
      elsewhere the deterministic kernels run).

  Returns:
    out [B, Tq, Hq, D] in q's dtype, or (out, lse). A row that sees no key
    gets out = 0 and lse = -inf.
  """
  problem = validate.make_problem(q, k, v, groups, causal=causal,
                                  softmax_scale=softmax_scale, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids,
                                  local_window_size=local_window_size,
                                  logits_soft_cap=logits_soft_cap)
  return _run(autodiff.differentiable, problem, q, k, v, q_segment_ids, kv_segment_ids,
              backend=backend, interpret=interpret, config=config, backward=backward,
              return_lse=return_lse, sinks=sinks, deterministic=deterministic)


def _run(launch, problem, q, k, v, q_segment_ids, kv_segment_ids, *, backend, interpret,
         config, backward, return_lse, sinks, deterministic):
  """A validated problem: resolve the kernels once, ``launch(problem, kernels, q, k, v,
  q_segment_ids, kv_segment_ids, sinks=) -> (out, lse)`` with the sinks, return out (and lse)."""
  return_lse = validate.check_bool("return_lse", return_lse)
  sinks = sinks_lib.check_sinks(sinks, problem.hq)
  kernels = resolve(backend, interpret, config, backward, problem, q.dtype, deterministic)
  out, lse = launch(problem, kernels, q, k, v, q_segment_ids, kv_segment_ids, sinks=sinks)
  return (out, lse) if return_lse else out


def _sinks_after(launch):
  """A context-parallel launch with the sinks merged into its finished (out, lse):
  once, after the strategy's own merge; JAX differentiates the merge."""
  def run(problem, kernels, *arrays, sinks):
    return sinks_lib.with_sinks(*launch(problem, kernels, *arrays), sinks)
  return run


def attention(q, k, v, *, causal=False, softmax_scale=None, segment_ids=None,
              q_segment_ids=None, kv_segment_ids=None, backend="auto",
              return_lse=False, config=None, interpret=None, backward="kernel",
              context_parallel=None, local_window_size=None, logits_soft_cap=None,
              sinks=None, deterministic=True):
  """Standard self/cross attention with this library's (bottom-right) causal alignment.

  One group ``QueryGroup(0, Tq, Tk - Tq, Tk)``: with ``causal`` and Tq != Tk
  the mask is bottom-right aligned (the last query row sees every key)::

      Tq=3, Tk=5, causal     key: 0 1 2 3 4
                        row 0     x x x . .
                        row 1     x x x x .
                        row 2     x x x x x

  The window (``local_window_size``) is relative to the same positions: row i
  sits at position Tk - Tq + i. For jax.nn's top-left alignment and
  signature use :func:`dot_product_attention`.

  ``segment_ids`` [B, T] is the self-attention shortcut (Tq == Tk) for
  ``q_segment_ids = kv_segment_ids = segment_ids``. Other arguments as in
  :func:`grouped_attention`.

  ``context_parallel=ContextParallel(axis_name, strategy)``: inside
  ``jax.shard_map``, q, k, v (and segment ids) are this device's zigzag shards
  of one sequence sharded over ``axis_name`` (see ``jax_grouped_attn.cp``);
  the result is this device's shard of the exact full-sequence attention.
  """
  for name, x in (("q", q), ("k", k)):
    validate.check_array(name, x)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    if q.shape[1] != k.shape[1]:
      raise ValueError(
          f"segment_ids is for self-attention (Tq == Tk) but {q.shape=}, "
          f"{k.shape=}; pass q_segment_ids and kv_segment_ids instead.")
    q_segment_ids = kv_segment_ids = segment_ids
  if context_parallel is not None and not isinstance(context_parallel, cp.ContextParallel):
    raise TypeError(
        f"context_parallel must be None or a ContextParallel, got {context_parallel!r}.")
  tq, tk = q.shape[1], k.shape[1]
  # Under context parallelism the shards carry their positions (zigzag); the
  # strategy draws the groups, so the local problem is plain self-attention.
  group = QueryGroup(0, tq, 0, tk) if context_parallel is not None else QueryGroup(
      0, tq, tk - tq, tk)
  problem = validate.make_problem(
      q, k, v, (group,), causal=causal, softmax_scale=softmax_scale,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap)
  launch = autodiff.differentiable if context_parallel is None else _sinks_after(
      lambda problem, kernels, *arrays: cp.local_attention(problem, context_parallel, kernels,
                                                           *arrays))
  return _run(launch, problem, q, k, v, q_segment_ids, kv_segment_ids, backend=backend,
              interpret=interpret, config=config, backward=backward, return_lse=return_lse,
              sinks=sinks, deterministic=deterministic)


def context_parallel_attention(q, k, v, mesh, axis_name, *, strategy="allgather",
                               ulysses_axis_name=None, causal=False, softmax_scale=None,
                               segment_ids=None, q_segment_ids=None, kv_segment_ids=None,
                               batch_axis_name=None, backend="auto",
                               return_lse=False, config=None, interpret=None,
                               backward="kernel", local_window_size=None,
                               logits_soft_cap=None, sinks=None, deterministic=True):
  """Zigzag context-parallel self-attention of GLOBAL arrays in natural order.

  Shards the sequence (axis 1) over mesh axes ``cp.sequence_axes`` (and the
  batch over ``batch_axis_name`` if given) in natural order; inside
  ``jax.shard_map`` moves each shard to zigzag order (two ``ppermute``s), runs
  ``attention(..., context_parallel=cp)`` with ``cp = ContextParallel(axis_name,
  strategy, ulysses_axis_name)`` and moves the result back.

  Works on meshes with Auto or Explicit axes (``jax.make_mesh``'s default in
  new JAX). On Explicit axes the inputs are resharded to
  ``P(batch_axis_name, cp.sequence_axes)``, and ``out`` keeps that sharding
  (``lse``: ``P(batch_axis_name, None, cp.sequence_axes)``). JAX itself wants eager
  differentiation on Explicit axes inside ``with jax.set_mesh(mesh):``
  (jitted code does not need it).

  Args:
    q: [B, S, Hq, D]; k, v: [B, S, Hk, D]; S divisible by 2 * W, W the product
      of the sizes of ``axis_name`` (and ``ulysses_axis_name``) on ``mesh``.
    strategy, ulysses_axis_name: as in :class:`ContextParallel`.
    segment_ids / q_segment_ids / kv_segment_ids: [B, S] int (as in ``attention``).
    local_window_size: sliding window over sequence positions, as in
      :func:`jax_grouped_attn.attention`.
    Other arguments as in :func:`jax_grouped_attn.attention`.

  Returns:
    out [B, S, Hq, D] (natural order), or (out, lse [B, Hq, S] f32).
  """
  spec = cp.ContextParallel(axis_name, strategy, ulysses_axis_name)
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  validate.check_context_parallel_global(q, k, v, mesh.shape, spec.sequence_axes,
                                         batch_axis_name)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    q_segment_ids = kv_segment_ids = segment_ids
  # Validated once, on the global arrays; the shard_map body trusts them.
  s_len = q.shape[1]
  problem = validate.make_problem(
      q, k, v, (QueryGroup(0, s_len, 0, s_len),), causal=causal, softmax_scale=softmax_scale,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap)
  launch = _sinks_after(lambda problem, kernels, *arrays: global_attention(
      problem, spec, kernels, mesh, batch_axis_name, *arrays))
  return _run(launch, problem, q, k, v, q_segment_ids, kv_segment_ids, backend=backend,
              interpret=interpret, config=config, backward=backward, return_lse=return_lse,
              sinks=sinks, deterministic=deterministic)


def segment_ids_from_cu_seqlens(cu_seqlens, total_len: int):
  """flash-attn varlen ``cu_seqlens`` [n+1] (or [B, n+1]) -> segment ids [total_len]
  (or [B, total_len]).

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
