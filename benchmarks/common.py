"""Shared benchmark pieces: workloads, inputs, an exact chunked oracle, timing.

The oracle is exact fp32 attention (forward and backward) over whole tensors,
scanned over query-row chunks so it never holds more than one [chunk, Tk]
block of logits per head: it checks every row of a 128K-token problem without
materialising T^2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import platform as _platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_grouped_attn import testing as tolerance
from jax_grouped_attn.cp import zigzag_groups
from jax_grouped_attn.groups import QueryGroup, row_positions, visible, visible_pairs
from jax_grouped_attn.reference import soft_cap

PASSES = ("fwd", "bwd", "fwdbwd")
# Matmuls per pass (at q/k's head_dim, at v's): the forward's S = QK^T and PV;
# the backward recomputes S and forms dQ = dS K, dK = dS^T Q (q/k's) and
# dP = dO V^T, dV = P^T dO (v's). With one head_dim: bwd 2.5x, fwd+bwd 3.5x the forward.
PASS_MATMULS = {"fwd": (1, 1), "bwd": (3, 2), "fwdbwd": (4, 3)}





# ------------------------------------------------------------- workloads ---

@dataclasses.dataclass(frozen=True)
class Workload:
  """One attention call: q [B, Tq, Hq, D] against k [B, Tk, Hk, D] and
  v [B, Tk, Hk, Dv] (Dv = ``dv``, else D)."""

  family: str            # "causal" | "zigzag" | "contiguous" | "custom" | "window"
  batch: int
  tq: int
  tk: int
  hq: int
  hk: int
  d: int
  groups: tuple
  dtype: str = "bfloat16"
  causal: bool = True
  world: int = 0         # zigzag / contiguous: world size, rank, total seq
  rank: int = 0
  seq: int = 0
  window: tuple | None = None   # Problem.window: (left, right), None = unbounded side
  softcap: float | None = None  # Problem.softcap: logits_soft_cap
  sinks: bool = False           # sinks=sink_logits(self), one logit per query head
  dv: int | None = None         # v's head_dim (MLA); None: D, q/k's

  @property
  def name(self) -> str:
    heads = f"Hq{self.hq} Hk{self.hk} D{self.d}{self._variant_text}"
    if self.family in ("zigzag", "contiguous"):
      return f"{self.family} W{self.world} S{self.seq} r{self.rank} B{self.batch} {heads}"
    return f"{self.family} B{self.batch} S{self.tk} {heads}"

  @property
  def series(self) -> str:
    """The name without the rank: what per-rank rows are summarised under."""
    if self.family in ("zigzag", "contiguous"):
      return (f"{self.family} W{self.world} S{self.seq} B{self.batch} "
              f"Hq{self.hq} Hk{self.hk} D{self.d}{self._variant_text}")
    return self.name

  @property
  def _window_text(self) -> str:
    if self.window is None:
      return ""
    left, right = ("inf" if x is None else x for x in self.window)
    return f" window ({left}, {right})"

  @property
  def _variant_text(self) -> str:
    return (("" if self.dv is None else f" Dv{self.dv}") + self._window_text
            + ("" if self.softcap is None else f" softcap {self.softcap:g}")
            + (" sinks" if self.sinks else ""))

  @property
  def pairs(self) -> int:
    """Visible (query, key) pairs per batch row and query head."""
    return visible_pairs(self.groups, self.causal, self.window)

  @property
  def v_head_dim(self) -> int:
    """v's (and out's) head_dim: ``dv``, else D."""
    return self.d if self.dv is None else self.dv

  def flops(self, pass_: str = "fwd") -> float:
    """2 * pairs * head_dim per matmul per (batch, head), each matmul at its own
    head_dim (PASS_MATMULS): forward 2 * pairs * (D + Dv), = 4 * pairs * D at Dv = D."""
    n_qk, n_v = PASS_MATMULS[pass_]
    per_pair = 2.0 * (n_qk * self.d + n_v * self.v_head_dim)
    return per_pair * self.pairs * self.batch * self.hq

  @property
  def is_standard(self) -> bool:
    """One causal self-attention group (what cuDNN/jax mha take directly)."""
    return (len(self.groups) == 1 and self.tq == self.tk and self.causal
            and self.groups[0] == QueryGroup(0, self.tq, 0, self.tk))

  def logits_bytes(self) -> int:
    """What the T^2 (xla) reference materialises per fp32 [B, Hq, Tq, Tk] tensor."""
    return 4 * self.batch * self.hq * self.tq * self.tk


def causal_workload(batch, seq, hq, hk, d, dtype="bfloat16", family="causal",
                    window=None) -> Workload:
  """Causal self-attention; ``window`` is Problem.window ((left, right), None: unbounded)."""
  return Workload(family, batch, seq, seq, hq, hk, d, (QueryGroup(0, seq, 0, seq),), dtype,
                  window=window)


def zigzag_workload(world, seq, rank, hq=32, hk=8, d=128, batch=1, dtype="bfloat16") -> Workload:
  """Rank ``rank`` of ``world``: local q = its 2 zigzag chunks, k, v = the full sequence."""
  if seq % (2 * world):
    raise ValueError(f"seq={seq} must be divisible by 2*world={2 * world}.")
  c = seq // (2 * world)
  return Workload("zigzag", batch, 2 * c, seq, hq, hk, d, zigzag_groups(rank, world, c),
                  dtype, world=world, rank=rank, seq=seq)


def contiguous_workload(world, seq, rank, hq=32, hk=8, d=128, batch=1,
                        dtype="bfloat16") -> Workload:
  """Rank ``rank`` of contiguous sharding: rows [r*c2, (r+1)*c2) with c2 = S/W."""
  if seq % world:
    raise ValueError(f"seq={seq} must be divisible by world={world}.")
  c2 = seq // world
  return Workload("contiguous", batch, c2, seq, hq, hk, d,
                  (QueryGroup(0, c2, rank * c2, (rank + 1) * c2),), dtype,
                  world=world, rank=rank, seq=seq)


# ------------------------------------------------------------ environment ---

def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def on_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def device_name() -> str:
  return jax.devices()[0].device_kind


def _run(cmd) -> str | None:
  """stdout of ``cmd`` if it exists and runs, else None."""
  import shutil  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  if shutil.which(cmd[0]) is None:
    return None
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def environment(devices=None) -> dict:
  """GPU name and the versions that decide the numbers; with ``devices`` (a
  multi-device run) also the world, each device and the interconnect."""
  info = {
      "device": device_name(),
      "platform": jax.default_backend(),
      "device_count": jax.device_count(),
      "python": sys.version.split()[0],
      "host": _platform.node(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "triton": _version("triton"),
      "jax_triton": _version("jax-triton"),
      "cudnn": None,
      "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  try:
    from jax._src.lib import cuda_versions  # noqa: PLC0415 (GPU jaxlib only)
    if cuda_versions is not None:
      info["cudnn"] = cuda_versions.cudnn_get_version()
  except Exception:  # noqa: BLE001 -- best effort, absent on CPU
    pass
  if devices is not None:
    info["world"] = len(devices)
    info["devices"] = [d.device_kind for d in devices]
    info["nvidia_smi_topo"] = _run(["nvidia-smi", "topo", "-m"])
    info["nvidia_smi_gpus"] = _run(["nvidia-smi", "-L"])
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return info


# ----------------------------------------------------------------- inputs ---

def input_shapes(wl: Workload):
  """q, k, v, do of ``wl`` as jax.ShapeDtypeStruct (what compiling needs)."""
  dt = jnp.dtype(wl.dtype)
  dv = wl.v_head_dim
  return tuple(jax.ShapeDtypeStruct(s, dt) for s in (
      (wl.batch, wl.tq, wl.hq, wl.d), (wl.batch, wl.tk, wl.hk, wl.d),
      (wl.batch, wl.tk, wl.hk, dv), (wl.batch, wl.tq, wl.hq, dv)))


def make_inputs(wl: Workload, seed: int):
  """Random normal q, k [.., D], v and output cotangent [.., Dv] in the workload's dtype."""
  shapes = tuple(x.shape for x in input_shapes(wl))
  return _random_inputs(jax.random.PRNGKey(seed), shapes, jnp.dtype(wl.dtype).name)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_inputs(key, shapes, dtype):
  """One compile per workload's shapes (not one per array)."""
  return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype)
               for k, s in zip(jax.random.split(key, len(shapes)), shapes))


def global_key(wl: Workload) -> tuple:
  """Workloads with equal keys share one global q, k, v, do (ranks of one world)."""
  return (wl.batch, wl.tk, wl.hq, wl.hk, wl.d, wl.dv, wl.dtype)


def make_global_inputs(wl: Workload, seed: int):
  """q, do over the full sequence ([B, Tk, Hq, D], [B, Tk, Hq, Dv]) and k, v: what
  every rank shares."""
  full = dataclasses.replace(wl, tq=wl.tk, groups=(QueryGroup(0, wl.tk, 0, wl.tk),))
  return make_inputs(full, seed)


def local_inputs(wl: Workload, global_set):
  """The rank's q, do rows (row i = the global row at its sequence position)."""
  q, k, v, do = global_set
  pos, _ = row_positions(wl.groups, wl.tq)
  if wl.tq == wl.tk and np.array_equal(pos, np.arange(wl.tk)):
    return q, k, v, do
  if pos.min() < 0 or pos.max() >= wl.tk:
    raise ValueError(f"{wl.name}: row positions outside [0, Tk) cannot index the global q")
  idx = jnp.asarray(pos, jnp.int32)
  return jnp.take(q, idx, axis=1), k, v, jnp.take(do, idx, axis=1)


# ----------------------------------------------------------------- oracle ---

def sink_logits(wl: Workload) -> np.ndarray | None:
  """The workload's ``sinks`` [Hq] float32 (None without): fixed, spread over
  [-2, 2], so heads differ."""
  return np.linspace(-2.0, 2.0, wl.hq, dtype=np.float32) if wl.sinks else None


def _oracle_impl(q, k, v, do, pos, kv_len, *, scale, causal, chunk, lowp_dtype=None,
                 window=None, softcap=None, sinks=None):
  """Exact fp32 forward and backward over whole tensors, scanned over row
  chunks of ``chunk`` rows (one [chunk, Tk] block of logits per head at a time).

  q: [B, Tq, Hq, D], do: [B, Tq, Hq, Dv] (Tq a multiple of chunk); k: [B, Tk, Hk, D],
  v: [B, Tk, Hk, Dv], all in the inputs' dtype;
  pos, kv_len: [Tq] int32 (row position and kv prefix; kv_len 0 = padding);
  window: Problem.window (None: none); softcap: Problem.softcap (None: none);
  sinks: a tuple of the query heads' sink logits (None: none), one more softmax term each.
  Returns {"out", "lse", "dq", "dk", "dv"} in fp32 (lse [B, Hq, Tq]), and with
  ``lowp_dtype`` also "lowp": the same from the plain attention in that dtype
  (what calibrates the tolerances, jax_grouped_attn/testing.py): P and dS
  rounded to it before their dots, fp32 accumulation and softmax, out rounded
  (as the kernels' delta sees it), and dq, dk, dv too.

  S = QK^T and dP = dO V^T have operands exact in the input dtype, so both
  precisions share them, computed with the input dtype's operands and fp32
  accumulation (the tensor cores on a GPU: exact products, fp32 sums); the
  other fp32 dots have fp32 operands and run at full fp32 precision.
  """
  hi = jax.lax.Precision.HIGHEST
  f32 = jnp.float32
  in_dt = q.dtype
  exact = lambda spec, a, b: jnp.einsum(spec, a.astype(in_dt), b.astype(in_dt), precision=hi,
                                        preferred_element_type=f32)
  full = lambda spec, a, b: jnp.einsum(spec, a.astype(f32), b.astype(f32), precision=hi)
  b, tq, hq, _ = q.shape
  tk, hk = k.shape[1], k.shape[2]
  g = hq // hk
  n = tq // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, hk, g, x.shape[-1]), 1, 0)
  j = jnp.arange(tk)
  sink = None if sinks is None else jnp.asarray(sinks, f32).reshape(1, hk, g, 1, 1)
  lowp = lowp_dtype is not None
  rnd = (lambda x: x.astype(lowp_dtype).astype(f32)) if lowp else None
  low = ((lambda spec, a, b: jnp.einsum(spec, a.astype(lowp_dtype), b.astype(lowp_dtype),
                                        precision=hi, preferred_element_type=f32))
         if lowp else None)

  def body(carry, xs):
    qi, doi, p_i, kv_i = xs
    s = exact("bqhgd,bkhd->bhgqk", qi, k) * scale
    s, cap_grad = soft_cap(s, softcap)   # dS then carries 1 - tanh^2
    mask = visible(p_i[:, None], j[None, :], kv_i[:, None], causal=causal, window=window)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sink is not None:
      m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    if sink is not None:   # the sink's term has no value: only the denominator grows
      l = l + jnp.exp(sink - m)
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(l), -jnp.inf)[..., 0]          # [b, hk, g, chunk]
    dp = exact("bqhgd,bkhd->bhgqk", doi, v)
    l_rows = jnp.moveaxis(l, (1, 2, 3), (2, 3, 1))   # [b, chunk, hk, g, 1]
    doi_f = doi.astype(f32)

    def grads(mm, p_un, o_rnd, cast):
      """(out, dq, dk, dv) of one precision from the unnormalised P."""
      o = o_rnd(mm("bhgqk,bkhd->bqhgd", p_un, v) / l_rows)
      pn = p_un / l
      delta = jnp.einsum("bqhgd,bqhgd->bhgq", doi_f, o, precision=hi)
      ds = pn * (dp - delta[..., None])
      if cap_grad is not None:
        ds = ds * cap_grad
      dq = cast(mm("bhgqk,bkhd->bqhgd", ds, k) * scale)
      dk = mm("bhgqk,bqhgd->bkhd", ds, qi) * scale
      dv = mm("bhgqk,bqhgd->bkhd", pn, doi)
      return o, dq, dk, dv

    ident = lambda x: x
    o, dq, dk, dv = grads(full, p, ident, ident)
    outs = {"out": o, "dq": dq, "lse": lse}
    new = {"dk": carry["dk"] + dk, "dv": carry["dv"] + dv}
    if lowp:
      o_l, dq_l, dk_l, dv_l = grads(low, p, rnd, rnd)
      outs["lowp"] = {"out": o_l, "dq": dq_l}
      new["lowp"] = {"dk": carry["lowp"]["dk"] + dk_l, "dv": carry["lowp"]["dv"] + dv_l}
    return new, outs

  zeros = lambda x: jnp.zeros(x.shape, f32)   # dk like k, dv like v
  init = {"dk": zeros(k), "dv": zeros(v)}
  if lowp:
    init["lowp"] = {"dk": zeros(k), "dv": zeros(v)}
  xs = (split(q), split(do), pos.reshape(n, chunk), kv_len.reshape(n, chunk))
  acc, outs = jax.lax.scan(body, init, xs)
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, tq, hq, x.shape[-1])
  # lse chunks [n, b, hk, g, chunk] -> [b, hq, tq]
  merge_lse = lambda x: jnp.moveaxis(x, 0, 3).reshape(b, hq, tq)
  res = {"out": merge(outs["out"]), "lse": merge_lse(outs["lse"]), "dq": merge(outs["dq"]),
         "dk": acc["dk"], "dv": acc["dv"]}
  if lowp:
    # Low precision: results in the input dtype, as a kernel returns them; its
    # lse is the fp32 one (S is exact in both).
    res["lowp"] = {"out": merge(outs["lowp"]["out"]), "lse": res["lse"],
                   "dq": merge(outs["lowp"]["dq"]), "dk": rnd(acc["lowp"]["dk"]),
                   "dv": rnd(acc["lowp"]["dv"])}
  return res


_oracle_jit = jax.jit(_oracle_impl, static_argnames=("scale", "causal", "chunk", "lowp_dtype",
                                                    "window", "softcap", "sinks"))
# Compiled oracles by argument shapes and static arguments: ranks of one world
# share one (their row positions are arguments). Bounded: each holds GPU code.
_ORACLE_CACHE: dict = {}
_ORACLE_CACHE_SIZE = 16
# XLA's autotuner spent ~30 s of the ~31 s an oracle took per workload on an
# H200 (timing dot algorithms for each new shape). An oracle runs once per
# workload, so the untuned default algorithms cost less than tuning them.
ORACLE_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}


def _run_oracle(args, statics: dict, timing: dict):
  """``_oracle_jit(*args, **statics)`` through a cached AOT compile, adding the
  seconds spent compiling and running to ``timing``."""
  key = (tuple((a.shape, str(a.dtype)) for a in args), tuple(sorted(statics.items())))
  exe = _ORACLE_CACHE.get(key)
  if exe is None:
    t0 = time.perf_counter()
    lowered = _oracle_jit.lower(*args, **statics)
    try:
      exe = lowered.compile(compiler_options=dict(ORACLE_COMPILER_OPTIONS) or None)
    except Exception:  # noqa: BLE001 -- an XLA without the option: its defaults
      exe = lowered.compile()
    timing["compile_s"] = timing.get("compile_s", 0.0) + time.perf_counter() - t0
    if len(_ORACLE_CACHE) >= _ORACLE_CACHE_SIZE:
      _ORACLE_CACHE.pop(next(iter(_ORACLE_CACHE)))
    _ORACLE_CACHE[key] = exe
  t0 = time.perf_counter()
  out = jax.block_until_ready(exe(*args))
  timing["run_s"] = timing.get("run_s", 0.0) + time.perf_counter() - t0
  return out


def oracle_chunk(wl: Workload, max_elems: int) -> int:
  """Rows per scan step: a power of two with one logits block (chunk x Tk x Hq
  x B) at most ``max_elems``, and no more rows than Tq needs."""
  per_row = max(1, wl.batch * wl.hq * wl.tk)
  chunk = 1 << max(0, int(math.floor(math.log2(max(1, max_elems // per_row)))))
  return int(min(chunk, 1 << math.ceil(math.log2(wl.tq))))


def oracle(wl: Workload, q, k, v, do, *, max_elems: int = 1 << 26, lowp: bool = True,
           timing: dict | None = None) -> dict:
  """Exact fp32 out, lse, dq, dk, dv over the whole tensors, on the device, and
  under "lowp" the same from the plain attention in the workload's dtype (the
  calibration of :func:`compare`; for float32 the exact results themselves).

  Every row of every batch row and head is checked; ``max_elems`` bounds one
  logits block (chunk rows x Tk x Hq x B), so memory stays ~10 such fp32 blocks.
  ``timing``: a dict that gets the seconds spent compiling ("compile_s") and
  running ("run_s") the oracle.
  """
  timing = {} if timing is None else timing
  chunk = oracle_chunk(wl, max_elems)
  tq_pad = -(-wl.tq // chunk) * chunk
  pos, kv_len = row_positions(wl.groups, wl.tq)
  pad = tq_pad - wl.tq
  pos = np.pad(pos, (0, pad)).astype(np.int32)
  kv_len = np.pad(kv_len, (0, pad)).astype(np.int32)   # padding rows see nothing
  padrows = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  args = (padrows(q), k, v, padrows(do), jnp.asarray(pos), jnp.asarray(kv_len))
  low_dt = jnp.dtype(wl.dtype)
  statics = dict(scale=1.0 / math.sqrt(wl.d), causal=wl.causal, chunk=chunk, window=wl.window,
                 softcap=wl.softcap,
                 lowp_dtype=None if (not lowp or low_dt == jnp.float32) else low_dt.name,
                 sinks=None if not wl.sinks else tuple(float(x) for x in sink_logits(wl)))
  r = _run_oracle(args, statics, timing)
  trim = lambda r: {"out": r["out"][:, :wl.tq], "lse": r["lse"][:, :, :wl.tq],
                    "dq": r["dq"][:, :wl.tq], "dk": r["dk"], "dv": r["dv"]}
  res = trim(r)
  if lowp:
    res["lowp"] = trim(r["lowp"]) if "lowp" in r else dict(res)
  return res


@jax.jit
def _error_stats(got, want, lowp):
  """The numbers of jax_grouped_attn.testing.check, on the device: whole
  tensors stay there, only scalars come back."""
  f32 = jnp.float32
  g, w, l = got.astype(f32), want.astype(f32), lowp.astype(f32)
  inf_w = jnp.isinf(w)
  fin = ~inf_w
  n = jnp.maximum(jnp.sum(fin), 1)
  scale = jnp.max(jnp.where(fin, jnp.abs(w), 0.0))
  safe = jnp.where(scale > 0, scale, 1.0)
  err = jnp.where(fin, jnp.abs(g - w), 0.0) / safe
  lerr = jnp.where(fin, jnp.abs(jnp.where(jnp.isinf(l), w, l) - w), 0.0) / safe
  return {
      "nan_got": jnp.sum(jnp.isnan(g)), "nan_ref": jnp.sum(jnp.isnan(w) | jnp.isnan(l)),
      "inf_differ": jnp.sum((jnp.isinf(g) != inf_w) | (inf_w & (g != w))),
      "finite": jnp.sum(fin), "scale": safe, "max_err": jnp.max(err),
      "mean_err": jnp.sum(err) / n, "lowp_max_err": jnp.max(lerr),
      "lowp_mean_err": jnp.sum(lerr) / n,
      "worst": jnp.argmax(err),
  }


def compare(got, want: dict, name: str, factor: float | None = None) -> dict:
  """Calibrated check (jax_grouped_attn/testing.py) of the whole tensor ``got``
  against ``want[name]`` (an :func:`oracle` result: "out", "lse", "dq", "dk"
  or "dv"), given the low-precision oracle's error, measured on the device.
  Returns the check's numbers (``max_err``: max |got - exact| / max |exact|),
  ``ok``, ``max_abs_err`` and ``worst`` (index of the largest error)."""
  ref, lowp = want[name], want["lowp"][name]
  fail = lambda why: {"name": name, "why": why, "ok": False, "ratio": None,
                      "max_err": None, "max_abs_err": None}
  if tuple(got.shape) != tuple(ref.shape):
    return fail(f"shapes got {tuple(got.shape)}, reference {tuple(ref.shape)}")
  st = {k: v.item() for k, v in jax.device_get(_error_stats(got, ref, lowp)).items()}
  if st["nan_got"]:
    return fail(f"{st['nan_got']} NaN")
  if st["nan_ref"]:
    return fail("NaN in a reference")
  if st["inf_differ"]:
    return fail(f"infinities differ at {st['inf_differ']} elements")
  check = tolerance.judge(name, scale=st["scale"], max_err=st["max_err"],
                          mean_err=st["mean_err"], lowp_max_err=st["lowp_max_err"],
                          lowp_mean_err=st["lowp_mean_err"], dtype=got.dtype,
                          factor=tolerance.FACTOR if factor is None else factor)
  res = check.as_dict()
  res["max_abs_err"] = st["max_err"] * st["scale"]
  res["ref_max_abs"] = st["scale"]
  res["worst"] = list(np.unravel_index(st["worst"], ref.shape)) if st["finite"] else None
  res["elements"] = int(np.prod(ref.shape))
  return res


# ----------------------------------------------------------------- timing ---

def block(x):
  return jax.block_until_ready(x)


# One round of back-to-back calls should last at least this long, so the one
# sync ending it (~0.1-0.3 ms of launch and sync latency) stays under ~1%.
ROUND_TARGET_MS = 25.0
MAX_CALLS = 64


def time_calls(fn, arg_sets, *, rounds: int, warmup: int, calls: int | None = None,
               clock=time.perf_counter, sync=None) -> dict:
  """Device time per call of ``fn(*args)``, in ms: ``rounds`` rounds of ``calls``
  back-to-back calls each (after one untimed round), one device sync per round (a training step's
  calls are not synced one by one either); per-call time = round time / calls.

  Returns the median over rounds (``median_ms``), ``min_ms``, ``max_ms``,
  ``spread`` ((max - min) / median), ``rounds``, ``calls`` and ``method``.
  ``calls`` None: enough that a round lasts ROUND_TARGET_MS (at least 2, at
  most MAX_CALLS), from one synced warm call. Input sets rotate from call to
  call, so consecutive calls do not reuse the same (L2-warm) buffers.
  ``clock`` and ``sync`` (default jax.block_until_ready) are for tests.
  """
  sync = block if sync is None else sync
  n = len(arg_sets)
  for i in range(warmup):
    sync(fn(*arg_sets[i % n]))
  if calls is None:
    t0 = clock()
    sync(fn(*arg_sets[warmup % n]))
    one_ms = max((clock() - t0) * 1e3, 1e-6)
    calls = int(min(MAX_CALLS, max(2, math.ceil(ROUND_TARGET_MS / one_ms))))
  per_call = []
  i = 0
  # One untimed round first: the clocks and queues settle at what the timed
  # rounds see (an H100's first round after a synced call ran ~10% slow).
  for _ in range(rounds + (1 if rounds > 1 else 0)):
    outs = []
    t0 = clock()
    for _ in range(calls):
      outs.append(fn(*arg_sets[i % n]))
      i += 1
    sync(outs)
    per_call.append((clock() - t0) * 1e3 / calls)
    del outs
  per_call = per_call[-rounds:]
  med = statistics.median(per_call)
  return {"median_ms": med, "min_ms": min(per_call), "max_ms": max(per_call),
          "spread": (max(per_call) - min(per_call)) / med if med else 0.0,
          "rounds": rounds, "calls": calls, "method": "back-to-back",
          "round_ms": [round(t, 4) for t in per_call]}


@contextlib.contextmanager
def clock(phases: dict, name: str):
  """Adds the seconds the ``with`` body takes to ``phases[name]`` (also when it raises)."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


def memory_stats(compiled) -> dict | None:
  """Sizes from the compiled executable's memory analysis (bytes), if any."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "peak_memory_in_bytes")
  out = {f.replace("_in_bytes", "_bytes"): int(getattr(m, f)) for f in fields if hasattr(m, f)}
  if not out.get("peak_memory_bytes"):
    out["peak_memory_bytes"] = (out.get("argument_size_bytes", 0) + out.get("output_size_bytes", 0)
                                + out.get("temp_size_bytes", 0) - out.get("alias_size_bytes", 0))
  return out


class Budget:
  """Wall-clock budget: ``exhausted`` once ``seconds`` have passed (None = no limit).

  ``clock``: seconds from any origin (time.monotonic; tests pass a fake one).
  """

  def __init__(self, seconds: float | None, clock=time.monotonic):
    self.seconds = seconds
    self.clock = clock
    self.t0 = clock()

  @property
  def elapsed(self) -> float:
    return self.clock() - self.t0

  @property
  def left(self) -> float | None:
    """Seconds left (None = no limit)."""
    return None if self.seconds is None else self.seconds - self.elapsed

  @property
  def exhausted(self) -> bool:
    return self.seconds is not None and self.elapsed > self.seconds


def progress(iterable=None, **kw):
  """tqdm when installed (to stderr), else the iterable itself."""
  try:
    from tqdm.auto import tqdm  # noqa: PLC0415
  except ImportError:
    class _Plain:
      def __init__(self, it=None, **_):
        self.it = it
      def __iter__(self):
        return iter(self.it)
      def update(self, *_): pass
      def set_postfix_str(self, *_a, **_k): pass
      def close(self): pass
      @staticmethod
      def write(s): print(s, flush=True)
    return _Plain(iterable)
  kw.setdefault("file", sys.stderr)
  kw.setdefault("dynamic_ncols", True)
  kw.setdefault("mininterval", 30.0 if not sys.stderr.isatty() else 0.1)
  return tqdm(iterable, **kw)


def log(msg: str) -> None:
  """Prints without breaking a running tqdm bar."""
  try:
    from tqdm.auto import tqdm  # noqa: PLC0415
    tqdm.write(msg, file=sys.stdout)
  except ImportError:
    print(msg)
  sys.stdout.flush()
