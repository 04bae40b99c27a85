"""The implementations compared by the benchmark, behind one interface.

Each ``Impl`` says whether it can run a workload here (``unavailable`` returns
the reason it cannot) and builds ``fn(q, k, v) -> out``, differentiable in
q, k, v. Rows:

  triton, pallas, xla     this project's grouped_attention, one launch
  triton-2launch, ...     the same kernel once per group, outputs concatenated
  cudnn                   jax.nn.dot_product_attention(implementation="cudnn");
                          for grouped workloads the lse-merged composition below
  jax-pallas-mha          jax.experimental.pallas.ops.gpu.attention.mha
  triton+padv, ...,       a v head_dim of its own (Workload.dv) as users run it where
  cudnn+padv              an implementation takes one: v zero-padded to q/k's, out sliced

The cuDNN composition. Group g (rows at positions q_pos.., keys < kv_len with
kv_len = q_pos + q_len, as in zigzag and contiguous sharding) is exactly
  prefix:   non-causal attention of its rows to keys [0, q_pos)
  diagonal: causal attention of its rows to keys [q_pos, kv_len) (square)
merged by log-sum-exp: L = logaddexp(lse_p, lse_d), out = sum_i exp(lse_i - L) o_i.
jax.nn.dot_product_attention returns the lse only cast to the output dtype
(bf16) and its VJP drops the lse cotangent, so the composition calls jax's
cuDNN custom_vjp rules directly: the forward rule gives fp32 lse, and the
backward rule of each part is handed the *merged* out and lse as its
residuals, which gives each part its exact share of dQ, dK, dV (the
flash-attention identity ring attention relies on). The rule's arguments are
recorded from jax's own public cudnn entry point, so argument lists that change
between jax versions are followed; if that fails the composition falls back
to the public API (bf16 lse, inexact gradients) and says so in its note.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import jax
import jax.numpy as jnp

import jax_grouped_attn as ga
from benchmarks import common, report
from benchmarks.common import Workload
from jax_grouped_attn import registry
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import reference_attention, reference_backward


@dataclasses.dataclass
class Context:
  gpu: bool
  xla_limit_bytes: int = 2 << 30     # skip the T^2 reference above this (GPU)


@dataclasses.dataclass
class Built:
  fn: object                 # (q, k, v) -> out
  note: str = ""
  # The forward pass's function: (q, k, v) -> (out, lse [B, Hq, Tq] fp32) where
  # the implementation's API gives the lse in fp32 (checked too); None: ``fn``.
  fwd_fn: object = None
  grad_exact: bool = True    # False: gradients known to be approximate
  # Calibrated-tolerance factor (jax_grouped_attn/testing.py); None: tolerance.FACTOR,
  # what this project's kernels must meet. Only third-party baselines loosen it.
  tolerance_factor: float | None = None


class Impl:
  name = "?"
  kind = "other"             # "grouped" | "two-launch" | "cudnn" | "reference" | "other"

  def unavailable(self, wl: Workload, ctx: Context) -> str | None:
    return None

  def build(self, wl: Workload, ctx: Context) -> Built:
    raise NotImplementedError


# ----------------------------------------------------------- this project ---

# The suffix of a row run with deterministic=False (the entries whose backward
# then differs: report.NONDET).
NONDET_SUFFIX = "-nondet"


class Grouped(Impl):
  """grouped_attention with one backend, all groups in one launch;
  ``deterministic=False`` is the caller's opt-in (a row named with NONDET_SUFFIX)."""

  kind = "grouped"

  def __init__(self, backend: str, deterministic: bool = True):
    self.backend = backend
    self.deterministic = deterministic
    self.name = backend + ("" if deterministic else NONDET_SUFFIX)

  def unavailable(self, wl, ctx):
    if self.backend == "xla":
      if ctx.gpu and wl.logits_bytes() > ctx.xla_limit_bytes:
        return (f"T^2 reference too large here ({wl.logits_bytes() / 2**30:.1f} GiB of "
                f"fp32 logits > {ctx.xla_limit_bytes / 2**30:.0f} GiB)")
      return None
    if wl.softcap is not None and not registry.get(self.backend).supports_softcap:
      return f"backend {self.backend!r} has no logit soft cap"
    if wl.dv is not None and not registry.get(self.backend).supports_head_dim_v:
      return f"backend {self.backend!r} has no v head_dim of its own"
    return registry.get(self.backend).unavailable(jax.default_backend())

  def build(self, wl, ctx):
    backend, groups, causal, window = self.backend, wl.groups, wl.causal, wl.window
    sinks = common.sink_logits(wl)
    call = lambda q, k, v, lse: ga.grouped_attention(
        q, k, v, groups, causal=causal, backend=backend, local_window_size=window,
        logits_soft_cap=wl.softcap, sinks=sinks, return_lse=lse,
        deterministic=self.deterministic)
    return Built(lambda q, k, v: call(q, k, v, False),
                 "T^2 reference" if registry.get(backend).native_autodiff else "one launch",
                 fwd_fn=lambda q, k, v: call(q, k, v, True))


class TwoLaunch(Impl):
  """The baseline the grouped kernel replaces: one launch per group."""

  kind = "two-launch"

  def __init__(self, backend: str):
    self.backend = backend
    self.name = f"{backend}-2launch"

  def unavailable(self, wl, ctx):
    if sum(g.q_len > 0 for g in wl.groups) < 2:
      return "single group: identical to the one-launch row"
    return Grouped(self.backend).unavailable(wl, ctx)

  def build(self, wl, ctx):
    backend, causal, window = self.backend, wl.causal, wl.window
    groups = [g for g in wl.groups if g.q_len > 0]
    sinks = common.sink_logits(wl)   # per row: each group's call takes them whole

    def fn(q, k, v):
      outs = []
      for g in groups:
        one = QueryGroup(0, g.q_len, g.q_pos, g.kv_len)
        outs.append(ga.grouped_attention(
            q[:, g.q_start:g.q_end], k[:, :g.kv_len], v[:, :g.kv_len], (one,),
            causal=causal, backend=backend, local_window_size=window,
            logits_soft_cap=wl.softcap, sinks=sinks))
      return jnp.concatenate(outs, axis=1)

    return Built(fn, f"{len(groups)} launches")


# ------------------------------------------------------- lse composition ---

def composition_parts(groups, causal: bool):
  """Per group: [(kv_start, kv_end, causal), ...] whose lse-merge is the group.

  Raises ValueError for a causal group that does not end on its diagonal
  (kv_len != q_pos + q_len): cuDNN's causal mask is top-left aligned.
  """
  plan = []
  for g in groups:
    if g.q_len == 0:
      continue
    if not causal:
      plan.append((g, ((0, g.kv_len, False),)))
      continue
    if g.q_pos < 0 or g.kv_len != g.q_pos + g.q_len:
      raise ValueError(
          f"{g}: the cuDNN composition needs kv_len == q_pos + q_len and q_pos >= 0 "
          "(prefix + square causal diagonal).")
    parts = ((0, g.q_pos, False),) if g.q_pos > 0 else ()
    plan.append((g, parts + ((g.q_pos, g.kv_len, True),)))
  return plan


def merge_by_lse(results, dtype):
  """[(out [B,T,H,D], lse [B,H,T] f32), ...] -> (merged out in dtype, merged lse)."""
  if len(results) == 1:
    out, lse = results[0]
    return out.astype(dtype), lse
  lses = jnp.stack([lse for _, lse in results])
  total = jax.nn.logsumexp(lses, axis=0)
  total_safe = jnp.where(jnp.isfinite(total), total, 0.0)
  out = 0.0
  for o, lse in results:
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - total_safe), 0.0)   # [B, H, T]
    out = out + o.astype(jnp.float32) * jnp.moveaxis(w, 1, 2)[..., None]
  return out.astype(dtype), total


class _Static:
  """A pytree leaf-less node carrying hashable static data through residuals."""

  def __init__(self, value):
    self.value = value


jax.tree_util.register_pytree_node(
    _Static, lambda s: ((), s.value), lambda value, _: _Static(value))


def composed_attention(groups, causal: bool, scale: float, parts):
  """fn(q, k, v) -> out: groups computed as lse-merged part calls.

  ``parts`` provides fwd(q, k, v, causal, scale) -> (out, lse [B,H,T] f32,
  handle), residual(handle, merged_out, merged_lse) -> pytree and
  bwd(residual, dout) -> (dq, dk, dv). Its backward is a custom VJP that
  hands every part the merged out and lse (exact gradients).
  """
  plan = composition_parts(groups, causal)

  def forward(q, k, v):
    outs, saved = [], []
    for g, segs in plan:
      qg = q[:, g.q_start:g.q_end]
      res = [parts.fwd(qg, k[:, a:b], v[:, a:b], c, scale) for a, b, c in segs]
      out, lse = merge_by_lse([(o, l) for o, l, _ in res], q.dtype)
      saved.append([parts.residual(h, out, lse) for _, _, h in res])
      outs.append(out)
    return jnp.concatenate(outs, axis=1), (saved, _Static(tuple(k.shape)))

  @jax.custom_vjp
  def fn(q, k, v):
    return forward(q, k, v)[0]

  def fn_bwd(residuals, dout):
    saved, kv_shape = residuals
    dk = jnp.zeros(kv_shape.value, jnp.float32)
    dv = jnp.zeros(kv_shape.value, jnp.float32)
    dq_groups = []
    for (g, segs), group_saved in zip(plan, saved):
      dog = dout[:, g.q_start:g.q_end]
      dqg = 0.0
      for (a, e, _), res in zip(segs, group_saved):
        dqp, dkp, dvp = parts.bwd(res, dog)
        dqg = dqg + dqp.astype(jnp.float32)
        dk = dk.at[:, a:e].add(dkp.astype(jnp.float32))
        dv = dv.at[:, a:e].add(dvp.astype(jnp.float32))
      dq_groups.append(dqg)
    dq = jnp.concatenate(dq_groups, axis=1)
    return dq.astype(dout.dtype), dk.astype(dout.dtype), dv.astype(dout.dtype)

  fn.defvjp(forward, fn_bwd)
  return fn


def plain_composition(groups, causal: bool, scale: float, part_fn):
  """The same merge without a custom VJP: autodiff through ``part_fn``.

  part_fn(q, k, v, causal, scale) -> (out, lse [B,H,T]).
  """
  plan = composition_parts(groups, causal)

  def fn(q, k, v):
    outs = []
    for g, segs in plan:
      qg = q[:, g.q_start:g.q_end]
      res = [part_fn(qg, k[:, a:b], v[:, a:b], c, scale) for a, b, c in segs]
      outs.append(merge_by_lse(res, q.dtype)[0])
    return jnp.concatenate(outs, axis=1)

  return fn


class ReferenceParts:
  """Parts computed by this project's fp32 reference (CPU tests of the composition)."""

  @staticmethod
  def _problem(q, k, causal, scale):
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    group = QueryGroup(0, t, 0, s) if not causal else QueryGroup(0, t, s - t, s)
    return Problem((group,), b, t, s, hq, hk, d, causal, scale, False)

  def fwd(self, q, k, v, causal, scale):
    problem = self._problem(q, k, causal, scale)
    out, lse = reference_attention(problem, q, k, v)
    return out, lse, (q, k, v, _Static(problem))

  def residual(self, handle, out, lse):
    return handle + (out, lse)

  def bwd(self, res, dout):
    q, k, v, static, out, lse = res
    dlse = jnp.zeros(lse.shape, jnp.float32)
    return reference_backward(static.value, q, k, v, None, None, out, lse, dout, dlse)


class _Captured(Exception):
  pass


class CudnnParts:
  """Parts through jax's cuDNN custom_vjp rules (fp32 lse, exact merged backward)."""

  def __init__(self):
    from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415
    self.fa = fa

  def _args(self, q, k, v, causal, scale):
    """The positional arguments jax's public cudnn entry point passes to its
    custom_vjp ``_dot_product_attention`` (recorded, not executed)."""
    fa = self.fa
    rule = fa._dot_product_attention
    box = {}

    def recorder(*args, **kwargs):
      box["args"], box["kwargs"] = args, kwargs
      raise _Captured

    fa._dot_product_attention = recorder
    try:
      fa.dot_product_attention(
          q, k, v, scale=scale,
          mask_type=fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK,
          qkv_layout="BTNH", return_residual=True)
    except _Captured:
      pass
    finally:
      fa._dot_product_attention = rule
    if "args" not in box:
      raise RuntimeError("jax's cudnn dot_product_attention did not reach _dot_product_attention")
    args = box["args"]
    if box["kwargs"]:
      bound = inspect.signature(rule.fun).bind(*args, **box["kwargs"])
      args = tuple(bound.args)
    if rule.fwd is None or rule.bwd is None:
      raise RuntimeError("jax's cudnn custom_vjp has no fwd/bwd rules")
    return rule, tuple(args)

  def fwd(self, q, k, v, causal, scale):
    rule, args = self._args(q, k, v, causal, scale)
    outputs, res = rule.fwd(*args)
    if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
      raise RuntimeError("cudnn forward rule returned no softmax statistics")
    out, lse = outputs[0], outputs[1]
    b, t, h, _ = q.shape
    if tuple(lse.shape) != (b, h, t):
      raise RuntimeError(f"cudnn lse has shape {lse.shape}, expected {(b, h, t)} (BNT)")
    nondiff = tuple(args[i] for i in rule.nondiff_argnums)
    return out, lse.astype(jnp.float32), (tuple(res), outputs, _Static(nondiff))

  def residual(self, handle, out, lse):
    res, outputs, nondiff = handle
    new, found = [], set()
    for r in res:
      if r is outputs[0]:
        new.append(out.astype(outputs[0].dtype))
        found.add(0)
      elif r is outputs[1]:
        new.append(lse.astype(outputs[1].dtype))
        found.add(1)
      else:
        new.append(r)
    if found != {0, 1}:
      raise RuntimeError("could not find cudnn's out/lse among its residuals")
    return (tuple(new), nondiff)

  def bwd(self, saved, dout):
    res, nondiff = saved
    rule = self.fa._dot_product_attention
    grads = rule.bwd(*nondiff.value, res, (dout, None))
    return grads[0], grads[1], grads[2]


def _public_cudnn_part(q, k, v, causal, scale):
  out, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                          implementation="cudnn", return_residual=True)
  return out, jnp.moveaxis(lse.astype(jnp.float32), 2, 1)     # BTN -> BNT


def jax_nn_causal(implementation: str | None, window=None, scale: float | None = None):
  """(q, k, v) -> causal jax.nn.dot_product_attention: the peer every front end
  times. ``window``: Problem.window ((left, right); None: unbounded)."""
  kw = {} if window is None else {"local_window_size": (window[0], window[1] or 0)}
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, implementation=implementation, **kw)


class Cudnn(Impl):
  name = "cudnn"
  kind = "cudnn"

  def unavailable(self, wl, ctx):
    if not ctx.gpu:
      return "cuDNN flash attention needs an NVIDIA GPU"
    if wl.dv is not None:
      return "jax.nn.dot_product_attention needs v shaped like k (one head_dim): see cudnn+padv"
    if wl.softcap is not None:
      return "jax.nn's cuDNN path has no logit soft cap"
    if wl.sinks:
      return "jax.nn's cuDNN path has no attention sinks"
    if wl.window is not None:
      if not wl.is_standard:
        return "the lse composition has no window"
      if wl.window[0] is None:
        return "jax.nn's local_window_size needs a bounded left side"
    if wl.is_standard:
      return None
    try:
      composition_parts(wl.groups, wl.causal)
    except ValueError as e:
      return str(e)
    return None

  def build(self, wl, ctx):
    scale = 1.0 / math.sqrt(wl.d)
    if wl.is_standard:
      return Built(jax_nn_causal("cudnn", wl.window, scale), "jax.nn.dot_product_attention")
    n_calls = sum(len(s) for _, s in composition_parts(wl.groups, wl.causal))
    note = f"composition: {n_calls} cuDNN calls merged by lse"
    # Each part's out (and dq, dk, dv) comes back rounded to the input dtype
    # before the fp32 merge, so the composition rounds twice where plain
    # attention rounds once: on an H200 (zigzag W8 S64K) it used 0.8-1.13x of
    # the allowance our kernels get. A baseline, so a looser factor.
    factor = 3.0
    try:
      parts = CudnnParts()
      fn = composed_attention(wl.groups, wl.causal, scale, parts)
      q = jax.ShapeDtypeStruct((wl.batch, wl.tq, wl.hq, wl.d), jnp.dtype(wl.dtype))
      kv = jax.ShapeDtypeStruct((wl.batch, wl.tk, wl.hk, wl.d), jnp.dtype(wl.dtype))
      jax.eval_shape(lambda q, k, v: jax.vjp(fn, q, k, v)[1](q.astype(q.dtype)), q, kv, kv)
      return Built(fn, note + " (exact merged backward)", tolerance_factor=factor)
    except Exception as e:  # noqa: BLE001 -- jax internals moved: public API
      reason = f"{type(e).__name__}: {e}"[:160]
      fn = plain_composition(wl.groups, wl.causal, scale, _public_cudnn_part)
      return Built(fn, note + f" via jax.nn (bf16 lse, inexact grads; internals: {reason})",
                   grad_exact=False, tolerance_factor=factor)


class JaxPallasMha(Impl):
  name = "jax-pallas-mha"
  kind = "other"

  def unavailable(self, wl, ctx):
    if (not wl.is_standard or wl.window is not None or wl.softcap is not None or wl.sinks
        or wl.dv is not None):
      return ("standard causal self-attention only (no window, no soft cap, no sinks, "
              "one head_dim)")
    if wl.hq != wl.hk:
      return "needs Hq == Hk (no GQA)"
    if wl.tq > 128 and wl.tq % 128:
      return "sequence must be a multiple of 128"
    try:
      self._module()
    except Exception as e:  # noqa: BLE001
      return f"not importable: {type(e).__name__}: {e}"[:160]
    return None

  @staticmethod
  def _module():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas.ops.gpu import attention  # noqa: PLC0415
    return attention

  def build(self, wl, ctx):
    mha = self._module().mha
    interpret = not ctx.gpu
    scale = 1.0 / math.sqrt(wl.d)
    fn = lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=True, interpret=interpret)
    # Its backward's largest errors are ~3x those of plain bf16 attention
    # (measured in interpret mode, S=32 D=32: dq 7.2e-3 vs 2.2e-3 relative):
    # a baseline we time, not a kernel we test, so it gets a looser factor.
    return Built(fn, "jax.experimental.pallas.ops.gpu.attention.mha", tolerance_factor=4.0)


# ----------------------------------------------------- padded-v workaround ---

def pad_v(fn, d: int, dv: int):
  """fn(q, k, v) -> out at one head_dim ``d`` as fn(q, k, v [.., dv]) -> out [.., dv]:
  v zero-padded to ``d``, out sliced back. Out's padded columns are P @ 0 and
  never reach the slice; autodiff slices dv's and pads dout with zeros."""
  pad = ((0, 0), (0, 0), (0, 0), (0, d - dv))
  return lambda q, k, v: fn(q, k, jnp.pad(v, pad))[..., :dv]


class PadV(Impl):
  """``inner`` on a workload with v's own head_dim (Workload.dv < D), the way
  users run an implementation that takes one head_dim: v zero-padded to q/k's."""

  def __init__(self, inner: Impl):
    self.inner = inner
    self.name = f"{inner.name}+padv"
    self.kind = inner.kind

  def unavailable(self, wl, ctx):
    if wl.dv is None:
      return "v has q/k's head_dim: nothing to pad"
    if wl.dv > wl.d:
      return f"v's head_dim {wl.dv} > q/k's {wl.d}: padding v cannot make them one"
    return self.inner.unavailable(dataclasses.replace(wl, dv=None), ctx)

  def build(self, wl, ctx):
    built = self.inner.build(dataclasses.replace(wl, dv=None), ctx)
    note = f"v zero-padded to D{wl.d}, out sliced to Dv{wl.dv}; {built.note}"
    fwd_fn = None
    if built.fwd_fn is not None:
      inner_fwd, d, dv = built.fwd_fn, wl.d, wl.dv

      def fwd_fn(q, k, v):   # the same pad_v, the lse passed beside it
        lse = []

        def out_only(q, k, v):
          out, l = inner_fwd(q, k, v)
          lse.append(l)
          return out
        return pad_v(out_only, d, dv)(q, k, v), lse[0]
    return dataclasses.replace(built, fn=pad_v(built.fn, wl.d, wl.dv), note=note, fwd_fn=fwd_fn)


def all_impls() -> dict[str, Impl]:
  """This project's rows (one per registry entry, and per kernel entry its
  one-launch-per-group baseline and its padded-v workaround), then the peers."""
  kernels = [b.name for b in registry.kernel_entries()]
  impls = ([Grouped(n) for n in kernels] + [Grouped(n, False) for n in report.NONDET]
           + [Grouped("xla")] + [TwoLaunch(n) for n in kernels]
           + [PadV(Grouped(n)) for n in kernels] + [Cudnn(), PadV(Cudnn()), JaxPallasMha()])
  return {i.name: i for i in impls}


IMPL_NAMES = tuple(all_impls())
