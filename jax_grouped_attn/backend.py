"""What a backend is: the interface every registry entry implements.

A :class:`Backend` owns its name, its config classes (one per pass), its
heuristic defaults, its availability on this machine and its launchability
checks, and computes forward and backward on the user's layout::

    forward(problem, config, interpret, q, k, v, q_seg, kv_seg) -> (out, lse)
    backward(problem, config, interpret, q, k, v, q_seg, kv_seg, out, lse,
             dout, dlse) -> (dq, dk, dv)

with q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], segment ids [B, Tq] / [B, Tk] int
or None, out [B, Tq, Hq, D], lse [B, Hq, Tq] float32 (natural log). ``out`` /
``lse`` given to backward may be the merged result of several kv chunks
(context-parallel ring): each chunk then gets its exact share.

:class:`KernelBackend` is the shared base of kernel families: it pads to the
layout fixed by ``plan.py`` once, makes the launch vmappable, and calls its
launcher module's ``forward`` / ``backward`` on the padded arrays.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from jax_grouped_attn import plan as plan_lib, vma
from jax_grouped_attn.config import BackwardConfig, ForwardConfig, padded_head_dim, tile_candidates
from jax_grouped_attn.plan import Problem


class Backend:
  """Interface of a registry entry (see the module docstring)."""

  name: str = ""
  # Config class per pass (None: the backend takes no config for that pass).
  forward_config_class: type | None = None
  backward_config_class: type | None = None
  # Runs without a GPU (an interpreter), so it is tested in CI.
  interpretable: bool = False
  # Its interpreter passes shard_map's varying-axes check (check_vma=True).
  interpret_vma: bool = True
  # JAX autodiff of ``forward`` is exact (no custom_vjp needed).
  native_autodiff: bool = False
  # Computes Problem.softcap (logit soft-capping) in both passes.
  supports_softcap: bool = False
  # Takes a v head_dim other than q/k's (Problem.head_dim_v).
  supports_head_dim_v: bool = False

  def config_class(self, pass_: str) -> type | None:
    return self.forward_config_class if pass_ == "forward" else self.backward_config_class

  def unavailable(self, platform: str) -> str | None:
    """Why this backend cannot run on ``platform`` here (None: it can)."""
    return None

  def auto_candidate(self, pass_: str, head_dim: int, dtype) -> bool:
    """Whether "auto" may pick this backend for ``pass_`` without a tuned
    timing (a backend known to be slow somewhere says so here)."""
    return True

  def supports(self, problem: Problem, dtype) -> str | None:
    """Why this backend cannot compute ``problem`` in ``dtype`` (None: it can)."""
    if problem.head_dim_v is not None and not self.supports_head_dim_v:
      return (f"v's head_dim {problem.head_dim_v} != q/k's {problem.head_dim} is not supported "
              f"by backend={self.name!r} yet; use backend='xla' (or 'auto', which picks it).")
    if problem.softcap is not None and not self.supports_softcap:
      return (f"logits_soft_cap={problem.softcap} is not supported by backend={self.name!r}; "
              "use backend='triton', 'pallas_triton' or 'xla' (or 'auto', which picks one that "
              "supports it).")
    return None

  def heuristic_config(self, pass_: str, head_dim: int, dtype, head_dim_v: int | None = None):
    """The default config of ``pass_`` when no tuned entry applies (``head_dim_v``:
    v's head_dim when it differs from q/k's ``head_dim``)."""
    return None

  def nondeterministic(self, config) -> str | None:
    """Why ``config`` gives results that vary run to run (None: it does not)."""
    return None

  def nondeterministic_config(self, pass_: str, problem: Problem, dtype):
    """The config of ``pass_`` to use under ``deterministic=False`` when the
    caller gave none (None: the deterministic default stays)."""
    return None

  def tuning_candidates(self, pass_: str, head_dim: int, mode: str) -> list:
    """Config instances the tuner tries for ``pass_`` ("smoke" / "quick" / "full")."""
    return []

  def small_configs(self) -> tuple:
    """Its smallest (forward, backward) configs (None: takes none): the shared
    test matrix runs them, so tiny problems still cross several blocks."""
    return (None, None)

  def check_launchable(self, problem: Problem, dtype, interpret: bool, *arrays) -> None:
    """Raises ValueError (naming the argument) if this call cannot run here."""

  def forward(self, problem, config, interpret, q, k, v, q_seg, kv_seg):
    raise NotImplementedError

  def backward(self, problem, config, interpret, q, k, v, q_seg, kv_seg, out, lse,
               dout, dlse):
    raise NotImplementedError

  def __repr__(self):
    return f"<backend {self.name}>"


# ------------------------------------------------------------------- vmap ---

def _fold(x, batched: bool, axis_size: int):
  """[V, B, ...] (or unbatched [B, ...]) -> [V*B, ...]."""
  if x is None:
    return None
  if not batched:
    x = jnp.broadcast_to(x, (axis_size,) + x.shape)
  return x.reshape((axis_size * x.shape[1],) + x.shape[2:])


def batch_folding(launch):
  """Makes a kernel launcher vmappable by folding vmapped axes into batch.

  Every array argument and result of ``launch`` has batch as its leading axis,
  so ``vmap`` over any extra leading axis is one launch with batch V*B.
  (triton_call and the interpreter callback have no batching rule of their
  own; Pallas gets the same single-launch behaviour for free.)
  """
  @functools.wraps(launch)
  def call(*arrays, **static):
    fn = jax.custom_batching.custom_vmap(lambda *a: launch(*a, **static))

    @fn.def_vmap
    def _rule(axis_size, in_batched, *a):
      folded = [_fold(x, b, axis_size) for x, b in zip(a, in_batched)]
      outs = call(*folded, **static)
      outs = jax.tree.map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), outs)
      return outs, jax.tree.map(lambda _: True, outs)

    return fn(*arrays)
  return call


# ----------------------------------------------------------------- layout ---

def pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def to_q_layout(x, plan: plan_lib.Plan, axis: int = 1):
  """[.., Tq, ..] -> [.., Tq_pad, ..] (each group padded to whole q blocks)."""
  return x if plan.identity_layout else jnp.take(x, jnp.asarray(plan.src_rows), axis=axis)


def to_q_layout_zero_padded(x, plan: plan_lib.Plan, axis: int = 1):
  """Like to_q_layout, with padding rows zeroed (cotangents: padding rows
  must contribute nothing to dK/dV)."""
  if plan.identity_layout:
    return x
  shape = [1] * x.ndim
  shape[axis] = plan.tq_pad
  valid = jnp.asarray(plan.valid_rows).reshape(shape)
  return jnp.where(valid, to_q_layout(x, plan, axis), jnp.zeros((), x.dtype))


def from_q_layout(x, plan: plan_lib.Plan, axis: int = 1):
  return x if plan.identity_layout else jnp.take(x, jnp.asarray(plan.dst_rows), axis=axis)


class KernelBackend(Backend):
  """A kernel family on the padded layouts of ``plan.py``.

  q and k reach its launchers padded to ``padded_head_dim`` of their head_dim
  and v to that of its own (``head_dims``); a family whose kernels take one
  width (``sizes_v_apart`` False) gets all three padded to the larger.

  Its launcher module (``launcher_module``, imported on first use) provides
    forward(q, k, v, q_seg, kv_seg, *, problem, plan, config, interpret)
        -> (out [B, Tq_pad, Hq, Dp], lse [B, Hq, Tq_pad] f32)
    backward(q, k, v, q_seg, kv_seg, out, lse, dout, dlse, *, problem, plan,
             config, interpret) -> (dq, dk, dv)   (padded; plan a BackwardPlan)
  Subclasses say how configs map to plans (``forward_plan`` /
  ``backward_plan``) and how head_dim is padded; ``heuristics`` is their
  module of ``forward_config(head_dim, dtype)`` and
  ``backward_config(head_dim, dtype)`` (the defaults without a tuned entry).
  """

  launcher_module: str = ""
  heuristics = None
  supports_head_dim_v = True   # v's own width, or q, k, v zero-padded to one (_prepare)
  # Its kernels size v's (and out's) tiles apart from q/k's.
  sizes_v_apart: bool = False

  def launcher(self):
    return importlib.import_module(self.launcher_module)

  def heuristic_config(self, pass_, head_dim, dtype, head_dim_v=None):
    make = (self.heuristics.forward_config if pass_ == "forward" else
            self.heuristics.backward_config)
    if self.sizes_v_apart:
      return make(head_dim, dtype, head_dim_v=head_dim_v)
    return make(head_dim if head_dim_v is None else max(head_dim, head_dim_v), dtype)

  def padded_head_dim(self, head_dim: int) -> int:
    return padded_head_dim(head_dim)

  def head_dims(self, problem: Problem) -> tuple[int, int]:
    """(q/k's, v's) padded head_dim at the launchers."""
    if self.sizes_v_apart:
      return self.padded_head_dim(problem.head_dim), self.padded_head_dim(problem.dv)
    dp = self.padded_head_dim(problem.tile_head_dim)
    return dp, dp

  def forward_plan(self, problem: Problem, config) -> plan_lib.Plan:
    return plan_lib.make_plan(problem, config.block_q, config.block_k)

  def backward_plan(self, problem: Problem, config) -> plan_lib.BackwardPlan:
    dq = config.dq
    return plan_lib.make_backward_plan(problem, config.block_q, config.block_k,
                                       dq.block_q, dq.block_k)

  def _prepare(self, problem: Problem, plan, q, k, v, q_seg, kv_seg):
    # Zero columns: padded q/k columns add 0 to scores; padded v columns give
    # out and dV columns of zeros, sliced off.
    dqk, dv = self.head_dims(problem)
    q = to_q_layout(pad_axis(q, 3, dqk), plan)
    k = pad_axis(pad_axis(k, 3, dqk), 1, plan.tk_pad)
    v = pad_axis(pad_axis(v, 3, dv), 1, plan.tk_pad)
    if problem.has_segments:
      q_seg = to_q_layout(q_seg.astype(jnp.int32), plan)
      kv_seg = pad_axis(kv_seg.astype(jnp.int32), 1, plan.tk_pad)
    else:
      q_seg = kv_seg = None
    return q, k, v, q_seg, kv_seg

  def forward(self, problem, config, interpret, q, k, v, q_seg, kv_seg):
    plan = self.forward_plan(problem, config)
    qp, kp, vp, qs, ks = self._prepare(problem, plan, q, k, v, q_seg, kv_seg)
    out_p, lse_p = batch_folding(self.launcher().forward)(
        qp, kp, vp, qs, ks, problem=problem, plan=plan, config=config,
        interpret=interpret)
    out = from_q_layout(out_p, plan)[..., :problem.dv]
    lse = from_q_layout(lse_p, plan, axis=2)
    # Inside shard_map: a launch's outputs vary like its inputs.
    axes = vma.union(q, k, v, q_seg, kv_seg)
    return vma.pvary(out, axes), vma.pvary(lse, axes)

  def backward(self, problem, config, interpret, q, k, v, q_seg, kv_seg, out, lse,
               dout, dlse):
    bplan = self.backward_plan(problem, config)
    plan = bplan.plan
    qp, kp, vp, qs, ks = self._prepare(problem, plan, q, k, v, q_seg, kv_seg)
    dv = vp.shape[-1]
    out_p = to_q_layout(pad_axis(out, 3, dv), plan)
    dout_p = to_q_layout_zero_padded(pad_axis(dout, 3, dv), plan)
    lse_p = to_q_layout(lse, plan, axis=2)
    dlse_p = to_q_layout_zero_padded(dlse, plan, axis=2)
    dq_p, dk_p, dv_p = batch_folding(self.launcher().backward)(
        qp, kp, vp, qs, ks, out_p, lse_p, dout_p, dlse_p, problem=problem,
        plan=bplan, config=config, interpret=interpret)
    d = problem.head_dim
    dq = from_q_layout(dq_p, plan)[..., :d]
    dk = dk_p[:, :problem.tk, :, :d]
    dv = dv_p[:, :problem.tk, :, :problem.dv]
    axes = vma.union(q, k, v, q_seg, kv_seg, dout)
    return tuple(vma.pvary(g.astype(x.dtype), axes) for g, x in ((dq, q), (dk, k), (dv, v)))


class TileKernelBackend(KernelBackend):
  """A kernel family on Triton-style tiles (ForwardConfig / BackwardConfig)."""

  forward_config_class = ForwardConfig
  backward_config_class = BackwardConfig

  def tuning_candidates(self, pass_, head_dim, mode):
    return tile_candidates(pass_, head_dim, mode)

  def small_configs(self):
    return (ForwardConfig(block_q=16, block_k=16), BackwardConfig(block_q=16, block_k=16))
