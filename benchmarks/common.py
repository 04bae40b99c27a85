"""Shared benchmark pieces: workloads, inputs, an exact chunked oracle, timing.

The oracle is exact fp32 attention (forward and backward) for a few heads and
batch rows, scanned over query-row chunks so it never holds more than one
[chunk, Tk] block of logits per head: it checks every row of a 128K-token
problem without materialising T^2.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

  family: str            # "causal" | "zigzag" | "contiguous" | "custom"
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


def gpu_slug(name: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
  from jax_grouped_attn.tuning import slug  # noqa: PLC0415
  return slug(name)


# ----------------------------------------------------------------- inputs ---

def make_inputs(wl: Workload, seed: int):
  """Random normal q, k [.., D], v and output cotangent [.., Dv] in the workload's dtype."""
  key = jax.random.PRNGKey(seed)
  kq, kk, kv, kd = jax.random.split(key, 4)
  dt = jnp.dtype(wl.dtype)
  dv = wl.v_head_dim
  q = jax.random.normal(kq, (wl.batch, wl.tq, wl.hq, wl.d), jnp.float32).astype(dt)
  k = jax.random.normal(kk, (wl.batch, wl.tk, wl.hk, wl.d), jnp.float32).astype(dt)
  v = jax.random.normal(kv, (wl.batch, wl.tk, wl.hk, dv), jnp.float32).astype(dt)
  do = jax.random.normal(kd, (wl.batch, wl.tq, wl.hq, dv), jnp.float32).astype(dt)
  return q, k, v, do


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

@dataclasses.dataclass(frozen=True)
class Selection:
  """Which batch rows and kv heads (with all their q heads) are checked."""

  batches: tuple
  kv_heads: tuple
  q_heads: tuple

  def q(self, x):   # [B, Tq, Hq, D or Dv] -> selected
    return x[np.asarray(self.batches)][:, :, np.asarray(self.q_heads)]

  def kv(self, x):  # [B, Tk, Hk, D or Dv] -> selected
    return x[np.asarray(self.batches)][:, :, np.asarray(self.kv_heads)]


def sink_logits(wl: Workload) -> np.ndarray | None:
  """The workload's ``sinks`` [Hq] float32 (None without): fixed, spread over
  [-2, 2], so heads differ."""
  return np.linspace(-2.0, 2.0, wl.hq, dtype=np.float32) if wl.sinks else None


def selection(wl: Workload, max_kv_heads: int = 2) -> Selection:
  """First and last batch row and kv head (fewer when they coincide)."""
  batches = tuple(sorted({0, wl.batch - 1}))
  kv = tuple(sorted({0, wl.hk - 1}))[:max_kv_heads]
  g = wl.hq // wl.hk
  q_heads = tuple(h for j in kv for h in range(j * g, (j + 1) * g))
  return Selection(batches, kv, q_heads)


def _oracle_impl(q, k, v, do, pos, kv_len, *, scale, causal, chunk, compute_dtype="float32",
                 window=None, softcap=None, sinks=None):
  """Exact fp32 forward and backward, scanned over row chunks of ``chunk`` rows.

  q: [B, Tq, Hq, D], do: [B, Tq, Hq, Dv] (Tq a multiple of chunk); k: [B, Tk, Hk, D],
  v: [B, Tk, Hk, Dv];
  pos, kv_len: [Tq] int32 (row position and kv prefix; kv_len 0 = padding);
  window: Problem.window (None: none); softcap: Problem.softcap (None: none);
  sinks: a tuple of q's heads' sink logits (None: none), one more softmax term each.
  Returns out [B, Tq, Hq, Dv], dq [B, Tq, Hq, D], dk [B, Tk, Hk, D] and
  dv [B, Tk, Hk, Dv], all fp32.
  ``compute_dtype`` other than float32: the plain low-precision attention
  whose error calibrates the tolerances (jax_grouped_attn/testing.py): matmul operands
  (q, k, v, dO, P, dS) rounded to it, fp32 accumulation and softmax, out
  rounded to it (as the kernels' delta sees it), and dq, dk, dv too.
  """
  hi = jax.lax.Precision.HIGHEST
  cd = jnp.dtype(compute_dtype)
  rnd = lambda x: x.astype(cd).astype(jnp.float32)
  mm = lambda spec, a, b: jnp.einsum(spec, rnd(a), rnd(b), precision=hi)
  b, tq, hq, _ = q.shape
  tk, hk = k.shape[1], k.shape[2]
  g = hq // hk
  n = tq // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, hk, g, x.shape[-1]), 1, 0)
  j = jnp.arange(tk)
  sink = None if sinks is None else jnp.asarray(sinks, jnp.float32).reshape(1, hk, g, 1, 1)

  def body(carry, xs):
    dk, dv = carry
    qi, doi, p_i, kv_i = xs
    s = mm("bqhgd,bkhd->bhgqk", qi, k) * scale
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
    l = jnp.where(l > 0, l, 1.0)
    o = rnd(mm("bhgqk,bkhd->bqhgd", p, v) / jnp.moveaxis(l, (1, 2, 3), (2, 3, 1)))
    p = p / l
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", rnd(doi), o, precision=hi)
    dp = mm("bqhgd,bkhd->bhgqk", doi, v)
    ds = p * (dp - delta[..., None])
    if cap_grad is not None:
      ds = ds * cap_grad
    dq = mm("bhgqk,bkhd->bqhgd", ds, k) * scale
    dk = dk + mm("bhgqk,bqhgd->bkhd", ds, qi) * scale
    dv = dv + mm("bhgqk,bqhgd->bkhd", p, doi)
    return (dk, dv), (o, dq)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)   # dk like k, dv like v
  xs = (split(q), split(do), pos.reshape(n, chunk), kv_len.reshape(n, chunk))
  (dk, dv), (o, dq) = jax.lax.scan(body, (zeros(k), zeros(v)), xs)
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, tq, hq, x.shape[-1])
  # (Low precision: results in the input dtype, as a kernel returns them.)
  return merge(o), rnd(merge(dq)), rnd(dk), rnd(dv)


_oracle_jit = jax.jit(_oracle_impl, static_argnames=("scale", "causal", "chunk", "compute_dtype",
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


def oracle(wl: Workload, q, k, v, do, sel: Selection, *, max_elems: int = 1 << 26,
           lowp: bool = True, timing: dict | None = None):
  """Exact fp32 out, dq (selected q heads) and dk, dv (selected kv heads), and
  under "lowp" the same from the plain attention in the workload's dtype (the
  calibration of :func:`compare`; for float32 the exact results themselves).

  Every row is checked; ``max_elems`` bounds one logits block (chunk rows x
  Tk x selected heads x batch rows) so memory stays ~5 such fp32 blocks.
  ``timing``: a dict that gets the seconds spent compiling ("compile_s") and
  running ("run_s") the oracle.
  """
  timing = {} if timing is None else timing
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  qs, dos = f32(sel.q(q)), f32(sel.q(do))
  ks, vs = f32(sel.kv(k)), f32(sel.kv(v))
  per_row = max(1, len(sel.batches) * len(sel.q_heads) * wl.tk)
  chunk = 1 << max(0, int(math.floor(math.log2(max(1, max_elems // per_row)))))
  chunk = int(min(chunk, 1 << math.ceil(math.log2(wl.tq))))
  tq_pad = -(-wl.tq // chunk) * chunk
  pos, kv_len = row_positions(wl.groups, wl.tq)
  pad = tq_pad - wl.tq
  pos = np.pad(pos, (0, pad)).astype(np.int32)
  kv_len = np.pad(kv_len, (0, pad)).astype(np.int32)   # padding rows see nothing
  padrows = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  args = (padrows(qs), ks, vs, padrows(dos), jnp.asarray(pos), jnp.asarray(kv_len))
  statics = dict(scale=1.0 / math.sqrt(wl.d), causal=wl.causal, chunk=chunk, window=wl.window,
                 softcap=wl.softcap,
                 sinks=None if not wl.sinks else tuple(float(x) for x in
                                                       sink_logits(wl)[list(sel.q_heads)]))
  run = lambda cd: _run_oracle(args, dict(statics, compute_dtype=cd), timing)
  trim = lambda r: {"out": r[0][:, :wl.tq], "dq": r[1][:, :wl.tq], "dk": r[2], "dv": r[3]}
  res = trim(run("float32"))
  if lowp:
    res["lowp"] = (dict(res) if jnp.dtype(wl.dtype) == jnp.float32
                   else trim(run(jnp.dtype(wl.dtype).name)))
  return res


def compare(got, want: dict, name: str, factor: float | None = None) -> dict:
  """Calibrated check (jax_grouped_attn/testing.py) of ``got`` against ``want[name]``
  (an :func:`oracle` result: "out", "dq", "dk" or "dv"), given the
  low-precision oracle's error. Returns the numbers, ``ok`` and ``max_abs_err``."""
  got_np = np.asarray(jnp.asarray(got, jnp.float32))
  ref = np.asarray(want[name], np.float32)
  lowp = np.asarray(want["lowp"][name], np.float32)
  check = tolerance.check(got_np, ref, lowp, name=name, dtype=jnp.dtype(got.dtype),
                          factor=tolerance.FACTOR if factor is None else factor)
  res = check.as_dict()
  finite = bool(np.isfinite(got_np).all())
  if not finite and not res["why"]:
    res["why"], res["ok"] = "non-finite values", False
  same = got_np.shape == ref.shape
  res["max_abs_err"] = float(np.max(np.abs(got_np - ref))) if same and got_np.size else None
  res["ref_max_abs"] = float(np.max(np.abs(ref))) if ref.size else 0.0
  return res


# ----------------------------------------------------------------- timing ---

def block(x):
  return jax.block_until_ready(x)


def time_calls(fn, arg_sets, *, reps: int, warmup: int) -> dict:
  """Median wall time of ``fn(*args)`` in ms, each call device-synchronised.

  Input sets rotate so consecutive calls do not reuse the same (L2-warm)
  buffers.
  """
  n = len(arg_sets)
  for i in range(warmup):
    block(fn(*arg_sets[i % n]))
  times = []
  for i in range(reps):
    args = arg_sets[i % n]
    t0 = time.perf_counter()
    block(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times),
          "max_ms": max(times), "reps": reps}


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


def env_flag(name: str) -> bool:
  return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
