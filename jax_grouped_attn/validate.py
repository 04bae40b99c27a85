"""The one validation path: user arguments -> a checked :class:`plan.Problem`.

Every public entry point calls :func:`make_problem` (or the checks it is made
of) before anything is traced; layers below trust the Problem.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn.groups import normalize_groups, visible
from jax_grouped_attn.plan import Problem

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Every backend pads head_dim inside (Triton dots to >= 16, Mosaic to >= 64).
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
BACKWARD_MODES = ("kernel", "reference")


def check_array(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be a jax/numpy array, got {type(x).__name__}.")
  if x.ndim != 4:
    raise ValueError(
        f"{name}.shape={tuple(x.shape)} has rank {x.ndim}; expected rank 4 "
        "[batch, seq, heads, head_dim].")


def check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_array(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
        f"q, k, v must share one dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}; "
        "cast them first (out has q's dtype).")
  if q.dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(f"{q.dtype=} is not supported; use bfloat16, float16 or float32.")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must have the same batch, length and heads, got {k.shape=}, "
                     f"{v.shape=} (v's head_dim, axis 3, may differ).")
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
  dv = v.shape[3]
  if dv % 8 or not MIN_HEAD_DIM <= dv <= MAX_HEAD_DIM:
    raise ValueError(
        f"v's head_dim={dv} (v.shape[3]) is not supported: it must be a multiple of 8 "
        f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}].")
  if hk == 0 or hq % hk:
    raise ValueError(
        f"q heads Hq={hq} must be a multiple of kv heads Hk={hk} (GQA/MQA): "
        f"{q.shape=}, {k.shape=}.")
  if min(b, tq, tk) < 1:
    raise ValueError(f"empty input: {q.shape=}, {k.shape=}; batch and sequence "
                     "lengths must be >= 1.")


def check_segment_ids(name, ids, batch, length, axis_name):
  if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
    raise TypeError(f"{name} must be an integer array, got {type(ids).__name__}.")
  if tuple(ids.shape) != (batch, length):
    raise ValueError(
        f"{name}.shape={tuple(ids.shape)} must be (batch, {axis_name}) = "
        f"({batch}, {length}).")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name}.dtype={ids.dtype} must be an integer dtype.")


def check_segments(q, k, q_segment_ids, kv_segment_ids) -> bool:
  """Checks the segment-id pair against q [B, Tq, ...] and k [B, Tk, ...];
  returns whether segments are used."""
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(
        "pass both q_segment_ids and kv_segment_ids or neither "
        f"(got q_segment_ids={'None' if q_segment_ids is None else 'array'}, "
        f"kv_segment_ids={'None' if kv_segment_ids is None else 'array'}).")
  if q_segment_ids is None:
    return False
  check_segment_ids("q_segment_ids", q_segment_ids, q.shape[0], q.shape[1], "Tq")
  check_segment_ids("kv_segment_ids", kv_segment_ids, k.shape[0], k.shape[1], "Tk")
  return True


def check_scale(softmax_scale, d, name="softmax_scale", *, arrays=True) -> float:
  """None -> 1/sqrt(d); a Python/NumPy number or (``arrays``) a concrete scalar
  array -> float; a traced one raises. The scale is static: the kernels are
  compiled for it."""
  if softmax_scale is None:
    return 1.0 / math.sqrt(d)
  value = softmax_scale
  if arrays and isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} is a traced value; it must be static (a Python float or a concrete "
        "scalar), since the kernels are compiled for one scale. Compute it outside "
        "jit, or close over it as a constant.")
  if arrays and isinstance(value, (jax.Array, np.ndarray)) and value.size == 1 and (
      jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
    value = value.item()
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.floating, np.integer)):
    raise TypeError(
        f"{name} must be None or a Python float (static)"
        f"{', or a concrete scalar array' if arrays else ''}, got "
        f"{type(softmax_scale).__name__}.")
  scale = float(value)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"{name}={softmax_scale!r} must be a finite positive number.")
  return scale


def check_softcap(logits_soft_cap, name="logits_soft_cap") -> float | None:
  """None (off) or a static finite float c > 0: scores become c * tanh(s / c)."""
  c = logits_soft_cap
  if c is None:
    return None
  if isinstance(c, jax.core.Tracer):
    raise ValueError(
        f"{name} is a traced value; it must be static (a Python float), since the "
        "kernels are compiled for one cap.")
  if isinstance(c, (jax.Array, np.ndarray)) and c.size == 1:
    c = c.item()
  if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.floating, np.integer)):
    raise TypeError(f"{name} must be None or a Python float > 0, got {type(c).__name__}.")
  c = float(c)
  if not (math.isfinite(c) and c > 0):
    raise ValueError(f"{name} must be a finite float > 0 (or None: no cap), got {c!r}.")
  return c


def check_window(local_window_size, causal: bool):
  """jax.nn's ``local_window_size`` -> Problem.window: None, or (left, right)
  with ints >= 0 or None (unbounded). An int w means (w, w). With ``causal``
  the right side adds nothing and is dropped; (None, None) is no window."""
  w = local_window_size
  if w is None:
    return None
  is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
  if is_int(w):
    w = (w, w)
  if (not isinstance(w, (tuple, list)) or len(w) != 2
      or not all(x is None or is_int(x) for x in w)):
    raise TypeError(
        f"local_window_size must be None, an int or a (left, right) pair of ints "
        f"(None for an unbounded side), got {local_window_size!r}.")
  left, right = (None if x is None else int(x) for x in w)
  for side, x in (("left", left), ("right", right)):
    if x is not None and x < 0:
      raise ValueError(
          f"local_window_size={local_window_size!r}: the {side} window must be >= 0 "
          "(a row always sees its own position's key when the window allows any).")
  if causal:
    right = None
  return None if left is None and right is None else (left, right)


def check_bool(name, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}.")
  return bool(value)


def check_dense_mask(mask, q_shape, tk: int, causal: bool, q_pos0: int, *, hint: str,
                     prefix: str = "") -> bool:
  """A dense boolean ``mask`` (broadcastable to [batch..., heads, Tq, Tk]) that a
  flash kernel can run: returns True if ``mask AND causal`` is exactly the causal
  mask, False if the mask is all True; raises ValueError naming ``mask``
  otherwise, and for a traced mask (it cannot be read).

  ``q_shape`` is the query's [batch..., Tq, heads, head_dim]; row i sits at
  position ``q_pos0 + i`` (0: jax.nn's top-left causal alignment, Tk - Tq:
  ``attention``'s bottom-right one). ``hint`` says what to pass instead;
  ``prefix`` starts every message.
  """
  try:
    m = np.asarray(mask).astype(bool)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError) as e:
    raise ValueError(
        f"{prefix}mask is a traced array, so it cannot be checked to be causal or "
        f"all-True (a flash kernel takes no dense mask). {hint}") from e
  *batch, tq, hq, _ = q_shape
  full = (*batch, hq, tq, tk)
  try:
    fits = np.broadcast_shapes(m.shape, full) == full
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
        f"{prefix}mask has shape {m.shape}, which does not broadcast to "
        f"[batch..., heads, Tq, Tk] = {full}.")
  c = visible(np.arange(tq)[:, None] + q_pos0, np.arange(tk)[None, :], tk, causal=True)
  eff = m & c if causal else m
  if np.array_equal(np.broadcast_to(eff, full), np.broadcast_to(c, full)):
    return True
  if not causal and m.all():
    return False
  align = ("top-left" if q_pos0 == 0 else "bottom-right" if q_pos0 == tk - tq
           else f"row 0 at position {q_pos0}")
  raise ValueError(
      f"{prefix}mask is neither all-True nor exactly the ({align} aligned) causal mask; "
      f"a flash kernel takes no dense mask. {hint}")


def check_backward_mode(backward) -> str:
  if backward not in BACKWARD_MODES:
    raise ValueError(f"backward={backward!r} is unknown; use one of {BACKWARD_MODES}.")
  return backward


def make_problem(q, k, v, groups, *, causal, softmax_scale, q_segment_ids,
                 kv_segment_ids, local_window_size=None, logits_soft_cap=None,
                 names=None) -> Problem:
  """Checks the arrays and arguments of one attention call; returns its Problem.

  ``names``: the caller's argument names where they differ from these (the
  drop-in's ``{"softmax_scale": "scale", "causal": "is_causal"}``), so errors
  name what the user passed."""
  names = names or {}
  check_qkv(q, k, v)
  b, tq, hq, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  groups = normalize_groups(groups, tq, tk)
  causal = check_bool(names.get("causal", "causal"), causal)
  has_segments = check_segments(q, k, q_segment_ids, kv_segment_ids)
  scale = check_scale(softmax_scale, d, names.get("softmax_scale", "softmax_scale"))
  window = check_window(local_window_size, causal)
  softcap = check_softcap(logits_soft_cap)
  dv = v.shape[3]
  return Problem(groups, b, tq, tk, hq, hk, d, causal, scale, has_segments, window, softcap,
                 None if dv == d else dv)


# ------------------------------------------------------ context parallelism --
# Every ContextParallel check lives here: the spec's fields (at construction),
# the local shards (inside shard_map, where the world sizes are known) and the
# global arrays of context_parallel_attention.

def _axis_names(name, what):
  names = name if isinstance(name, tuple) else (name,)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise TypeError(
        f"ContextParallel.{what} must be a mesh axis name (str) or a non-empty tuple "
        f"of them, got {name!r}.")
  return names


def check_context_parallel(axis_name, strategy, ulysses_axis_name, strategies) -> None:
  """The fields of a ContextParallel spec."""
  outer = _axis_names(axis_name, "axis_name")
  if strategy not in strategies:
    raise ValueError(
        f"ContextParallel.strategy={strategy!r} is unknown; use one of {strategies}.")
  if ulysses_axis_name is None:
    return
  inner = _axis_names(ulysses_axis_name, "ulysses_axis_name")
  if strategy == "ulysses":
    raise ValueError(
        f"ContextParallel(strategy='ulysses', ulysses_axis_name={ulysses_axis_name!r}): "
        "strategy='ulysses' already runs Ulysses over axis_name; ulysses_axis_name is "
        "for 2-D context parallelism with strategy='allgather' or 'ring' over axis_name.")
  if set(outer) & set(inner):
    raise ValueError(
        f"ContextParallel axis_name={axis_name!r} and ulysses_axis_name="
        f"{ulysses_axis_name!r} must be different mesh axes.")


def check_context_parallel_shards(q, k, ulysses_world: int, ulysses_axis) -> None:
  """The local zigzag shards q [B, 2c, Hq, D], k [B, 2c, Hk, D] inside shard_map."""
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(
        f"context parallel attention is self-attention over one sharded "
        f"sequence: the local shards must have equal length, got {q.shape=}, "
        f"{k.shape=}.")
  if t % 2:
    raise ValueError(
        f"{q.shape=}: the local shard length {t} must be even (two zigzag "
        "chunks of c tokens); the global length must be divisible by "
        "2*world_size.")
  if ulysses_world > 1 and q.shape[2] % ulysses_world:
    raise ValueError(
        f"{q.shape=}: Ulysses over {ulysses_axis!r} ({ulysses_world} devices) splits the "
        f"query heads, so Hq={q.shape[2]} must be divisible by {ulysses_world}; use "
        "strategy='allgather' or 'ring' there (or a smaller Ulysses axis).")


def check_context_parallel_global(q, k, v, mesh_shape, axes, batch_axis_name) -> int:
  """Global arrays of context_parallel_attention against the mesh; returns the
  sequence world size (product of ``axes``)."""
  for name in tuple(axes) + ((batch_axis_name,) if batch_axis_name is not None else ()):
    if name not in mesh_shape:
      raise ValueError(f"axis {name!r} is not an axis of the mesh {dict(mesh_shape)}.")
  world = int(np.prod([mesh_shape[n] for n in axes]))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or len(x.shape) != 4:
      raise ValueError(f"{name} must be a rank-4 array [batch, seq, heads, head_dim], "
                       f"got {getattr(x, 'shape', type(x).__name__)}.")
  if not q.shape[1] == k.shape[1] == v.shape[1]:
    raise ValueError(
        f"context parallel attention is self-attention: {q.shape=}, {k.shape=}, "
        f"{v.shape=} must share the sequence length (axis 1).")
  if q.shape[1] % (2 * world):
    shown = axes[0] if len(axes) == 1 else tuple(axes)
    raise ValueError(
        f"{q.shape=}: the sequence length {q.shape[1]} must be divisible by "
        f"2 * world_size = {2 * world} ({shown!r} has {world} devices); "
        "pad the sequence first.")
  return world
