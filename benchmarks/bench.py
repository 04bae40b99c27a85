"""Which attention implementation is fastest for my shape, and by how much?

  python -m benchmarks.bench                  # full GPU sweep (or CPU smoke)
  python -m benchmarks.bench --quick          # headline shapes, ~3 min on an H200
  python -m benchmarks.bench --shape 1x8192x32x8x128 --zigzag 8x65536
  python benchmarks/bench.py --workloads causal --backends triton,cudnn

All implementations run in one process on the same inputs. Every row is first
checked against an exact fp32 oracle (every query row; the first/last batch row
and kv head with all their query heads), then timed: median of warm,
device-synchronised repeats over rotating input sets. Passes: fwd, fwdbwd
(grads of q, k, v under a random cotangent, via jax.vjp) and bwd = fwdbwd - fwd.
TFLOP/s count visible (query, key) pairs only: 4 * pairs * D per (batch, head)
forward, 3.5x that for fwd+bwd.

Without a GPU the same command runs tiny shapes in interpret mode: a
correctness check of every code path. Its timings mean nothing.

Writes bench.json, bench.md and PNG plots to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import statistics
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common, impls, report  # noqa: E402
from benchmarks.common import Workload, log  # noqa: E402
from jax_grouped_attn import (
  platform as ga_platform,  # noqa: E402
  registry,  # noqa: E402
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORKLOAD_KINDS = ("causal", "zigzag", "balance")
BALANCE_PREFERENCE = report.GROUPED + ("cudnn", "xla")


# ------------------------------------------------------------- workloads ---

# The comparisons a run exists for, in run order: causal GQA, D64 and D256
# shapes (B, S, Hq, Hk, D), then zigzag worlds (W, S). Ours and cuDNN on each
# of these run before anything else, so a time budget cuts the rest first.
HEADLINE_CAUSAL = ((1, 8192, 32, 8, 128), (4, 4096, 16, 16, 64), (1, 8192, 16, 16, 256))
HEADLINE_ZIGZAG = ((8, 65536),)


def standard_set(mode: str) -> list[Workload]:
  cw = common.causal_workload
  if mode == "smoke":
    return [cw(1, 64, 2, 2, 32), cw(2, 48, 4, 2, 64)]
  headline = [cw(*shape) for shape in HEADLINE_CAUSAL]
  if mode == "quick":
    return headline + [cw(1, 8192, 32, 32, 128)]
  return [cw(1, 2048, 32, 8, 128), cw(1, 8192, 32, 32, 128), headline[0],
          cw(1, 32768, 32, 8, 128), headline[1], headline[2]]


def zigzag_set(mode: str) -> list[tuple[int, int]]:
  """(world size, total sequence) pairs."""
  if mode == "smoke":
    return [(2, 128), (4, 128)]
  if mode == "quick":
    return list(HEADLINE_ZIGZAG)
  # Weak scaling (8K local tokens per rank) plus a sequence sweep at W=8.
  return [(2, 16384), (4, 32768), (8, 65536), (16, 131072), (8, 16384), (8, 131072)]


def zigzag_heads(mode: str) -> dict:
  return dict(hq=4, hk=2, d=32) if mode == "smoke" else dict(hq=32, hk=8, d=128)


def parse_shape(text: str) -> Workload:
  try:
    b, s, hq, hk, d = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--shape {text!r}: expected BxSxHqxHkxD, e.g. 1x8192x32x8x128") from None
  return common.causal_workload(b, s, hq, hk, d, family="custom")


def parse_world(text: str) -> tuple[int, int]:
  try:
    w, s = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--zigzag {text!r}: expected WxS, e.g. 8x65536") from None
  if w < 1 or s % (2 * w):
    raise argparse.ArgumentTypeError(f"--zigzag {text!r}: S must be divisible by 2*W")
  return w, s


# ---------------------------------------------------------------- running ---

@dataclasses.dataclass
class Settings:
  passes: tuple
  reps: int
  warmup: int
  sets: int
  ctx: impls.Context


class Inputs:
  """Global inputs per world (shared by its ranks), per-rank views and oracles.

  A workload is revisited once per implementation (later tiers of the plan
  come back to it): its inputs and oracle are made once and kept until its
  last item ran. ``made`` counts how often each was made (tests check it).
  """

  def __init__(self, sets: int):
    self.sets = sets
    self.globals = {}
    self.local = {}
    self.oracles = {}
    self.pending = collections.Counter()
    self.made = collections.Counter()

  def reserve(self, wl: Workload) -> None:
    self.pending[common.global_key(wl)] += 1

  def release(self, wl: Workload) -> None:
    key = common.global_key(wl)
    self.pending[key] -= 1
    if self.pending[key] <= 0:
      self.globals.pop(key, None)
      for d in (self.local, self.oracles):
        for name in [n for n, w in d.items() if common.global_key(w[0]) == key]:
          del d[name]

  def inputs(self, wl: Workload, spent: dict | None = None):
    """The input sets of ``wl``; seconds spent making them go to ``spent["inputs_s"]``."""
    spent = {} if spent is None else spent
    key = common.global_key(wl)
    with common.clock(spent, "inputs_s"):
      if key not in self.globals:
        self.globals[key] = jax.block_until_ready(
            [common.make_global_inputs(wl, seed) for seed in range(self.sets)])
        self.made[("inputs", key)] += 1
      if wl.name not in self.local:
        self.local[wl.name] = (wl, jax.block_until_ready(
            [common.local_inputs(wl, g) for g in self.globals[key]]))
    return self.local[wl.name][1]

  def oracle(self, wl: Workload, spent: dict | None = None):
    """(selection, oracle) of ``wl`` on input set 0; seconds spent computing it go
    to ``spent["oracle_s"]`` (of which compiling: ``spent["oracle_compile_s"]``)."""
    spent = {} if spent is None else spent
    if wl.name not in self.oracles:
      sel = common.selection(wl)
      q, k, v, do = self.inputs(wl, spent)[0]
      timing = {}
      with common.clock(spent, "oracle_s"):
        want = jax.device_get(common.oracle(wl, q, k, v, do, sel, timing=timing))
      spent["oracle_compile_s"] = spent.get("oracle_compile_s", 0.0) + timing.get("compile_s", 0.0)
      self.oracles[wl.name] = (wl, sel, want)
      self.made[("oracle", wl.name)] += 1
    return self.oracles[wl.name][1:]


class WorkloadState:
  """What run_item needs for one workload: inputs, selection and (lazy) oracle,
  from the shared store; ``spent`` holds the seconds this state's run paid
  for them (0 when an earlier run of the workload already had)."""

  def __init__(self, wl: Workload, store: Inputs):
    self.wl = wl
    self.store = store
    self.spent = {"inputs_s": 0.0, "oracle_s": 0.0, "oracle_compile_s": 0.0}
    self.inputs = store.inputs(wl, self.spent)
    self.sel = common.selection(wl)

  @property
  def oracle(self):
    return self.store.oracle(self.wl, self.spent)[1]


def _row(wl: Workload, impl: impls.Impl, pass_: str, **kw) -> dict:
  row = {
      "workload": wl.name, "series": wl.series, "family": wl.family,
      "world": wl.world, "rank": wl.rank, "seq": wl.seq, "batch": wl.batch,
      "tq": wl.tq, "tk": wl.tk, "hq": wl.hq, "hk": wl.hk, "d": wl.d,
      "dtype": wl.dtype, "groups": [list(dataclasses.astuple(g)) for g in wl.groups],
      "impl": impl.name, "kind": impl.kind, "pass": pass_,
      "flops": wl.flops(pass_), "status": "skipped", "median_ms": None, "tflops": None,
  }
  row.update(kw)
  return row


def _error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _timed_row(row, timing):
  row.update(timing)
  row["tflops"] = row["flops"] / (timing["median_ms"] * 1e-3) / 1e12
  return row


def _measure(row, phases, compiled_of, args, check_of, arg_sets, st: Settings) -> None:
  """One pass: compile once (the same executable gives the memory analysis, the
  checked result and the timings), check against the oracle, then time.
  ``check_of(result) -> {name: check}``; phases get compile_s, check_s, time_s."""
  with common.clock(phases, "compile_s"):
    compiled = compiled_of()
  row["memory"] = common.memory_stats(compiled)
  with common.clock(phases, "check_s"):
    result = jax.block_until_ready(compiled(*args))
    checks = check_of(result)
    del result
  row["check"] = checks
  row["ok"] = all(c["ok"] for c in checks.values())
  # The checked call above was the first; warm-up calls touch the other sets.
  with common.clock(phases, "time_s"):
    _timed_row(row, common.time_calls(compiled, arg_sets, reps=st.reps, warmup=st.warmup))
  row["status"] = "ok" if row["ok"] else "wrong"


def _guarded(row: dict, state, measure) -> None:
  """``measure(phases)`` into ``row``: a skip or error becomes the row's status,
  and the phase timings are kept either way. The oracle is computed (or taken
  from the cache) first, so check_s is the check alone."""
  phases = {}
  try:
    state.oracle  # noqa: B018
    measure(phases)
  except NotImplementedError as e:
    row.update(status="skipped", reason=_error_text(e))
  except Exception as e:  # noqa: BLE001
    row.update(status="error", reason=_error_text(e), traceback=traceback.format_exc()[-2000:])
  row["phases"] = _rounded(phases)


def run_item(state: WorkloadState, impl: impls.Impl, st: Settings) -> list[dict]:
  """All passes of one implementation on one workload: check, then time.

  Rows carry ``phases`` (seconds): per measured pass compile_s, check_s and
  time_s; the first row also build_s, inputs_s and oracle_s (what this run paid
  for the shared inputs and oracle: 0 when cached) and run_s (the whole run).
  """
  t_run = time.perf_counter()
  wl = state.wl
  reason = impl.unavailable(wl, st.ctx)
  want_grad = "bwd" in st.passes or "fwdbwd" in st.passes
  if reason:
    return [_row(wl, impl, p, reason=reason) for p in st.passes]
  setup = {}
  try:
    with common.clock(setup, "build_s"):
      built = impl.build(wl, st.ctx)
  except Exception as e:  # noqa: BLE001
    return [_row(wl, impl, p, status="error", reason=_error_text(e),
                 traceback=traceback.format_exc()[-2000:]) for p in st.passes]
  rows = {}
  q, k, v, do = state.inputs[0]
  factor = built.tolerance_factor
  fn = built.fn

  # Forward: for its own row and for bwd = fwdbwd - fwd.
  fwd_row = _row(wl, impl, "fwd", note=built.note)
  if "fwd" in st.passes or "bwd" in st.passes:
    _guarded(fwd_row, state, lambda ph: _measure(
        fwd_row, ph, lambda: jax.jit(fn).lower(q, k, v).compile(), (q, k, v),
        lambda out: {"out": common.compare(state.sel.q(out), state.oracle, "out", factor)},
        [s[:3] for s in state.inputs], st))
    rows["fwd"] = fwd_row

  if want_grad:
    fb_row = _row(wl, impl, "fwdbwd", note=built.note)
    fb = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))

    def grad_checks(grads):
      want = state.oracle
      return {
          "dq": common.compare(state.sel.q(grads[0]), want, "dq", factor),
          "dk": common.compare(state.sel.kv(grads[1]), want, "dk", factor),
          "dv": common.compare(state.sel.kv(grads[2]), want, "dv", factor),
      }

    _guarded(fb_row, state, lambda ph: _measure(
        fb_row, ph, lambda: fb.lower(q, k, v, do).compile(), (q, k, v, do), grad_checks,
        state.inputs, st))
    if fb_row.get("status") not in ("skipped", "error") and not built.grad_exact:
      fb_row["note"] = built.note
    rows["fwdbwd"] = fb_row
    bwd_row = _row(wl, impl, "bwd", note=built.note)
    ms = None
    if fb_row.get("median_ms") is not None and fwd_row.get("median_ms") is not None:
      ms = fb_row["median_ms"] - fwd_row["median_ms"]
    if ms is not None and ms <= 0.02 * fb_row["median_ms"]:
      bwd_row.update(status=fb_row["status"], check=fb_row.get("check"), ok=fb_row.get("ok"),
                     reason="fwdbwd - fwd is below the timing noise")
    elif ms is not None:
      bwd_row.update(status=fb_row["status"], check=fb_row.get("check"), ok=fb_row.get("ok"),
                     median_ms=ms, derived="fwdbwd - fwd",
                     tflops=bwd_row["flops"] / (ms * 1e-3) / 1e12)
    else:
      bwd_row.update(status=fb_row["status"] if fb_row["status"] != "ok" else "skipped",
                     reason=fb_row.get("reason", "needs both fwd and fwdbwd timings"))
    rows["bwd"] = bwd_row
  out = [rows[p] for p in st.passes if p in rows]
  if out:   # what the run as a whole paid goes to its first row
    out[0]["phases"] = _rounded({**setup, **state.spent, **out[0].get("phases", {}),
                                 "run_s": time.perf_counter() - t_run})
  return out


def _rounded(phases: dict) -> dict:
  return {k: round(v, 3) for k, v in phases.items()}


def _print_rows(rows: list[dict]) -> None:
  """One line per pass; one line in all for an implementation skipped whole."""
  reasons = {(r["status"], r.get("reason")) for r in rows}
  if len(reasons) == 1 and rows[0]["status"] == "skipped":
    r = rows[0]
    log(f"{r['workload']:<46} {r['impl']:<16} {'*':<7} SKIPPED: {r.get('reason', '')}")
    return
  for r in rows:
    log(_status_line(r))
  line = phase_line(rows)
  if line:
    log(line)


def phase_line(rows: list[dict]) -> str:
  """Where one run's seconds went, in one line ("" when nothing ran)."""
  first = next((r for r in rows if "run_s" in (r.get("phases") or {})), None)
  if first is None:
    return ""
  ph = first["phases"]
  parts = [f"inputs {ph.get('inputs_s', 0):.1f}",
           f"oracle {ph.get('oracle_s', 0):.1f} (compile {ph.get('oracle_compile_s', 0):.1f})",
           f"build {ph.get('build_s', 0):.1f}"]
  for r in rows:
    p = r.get("phases") or {}
    if r["pass"] in ("fwd", "fwdbwd") and "compile_s" in p:
      parts.append(f"{r['pass']}: compile {p['compile_s']:.1f}, check {p.get('check_s', 0):.1f}, "
                   f"time {p.get('time_s', 0):.1f}")
  return (f"{first['workload']:<46} {first['impl']:<16} {'phases':<7} " + "; ".join(parts)
          + f"; run {ph.get('run_s', 0):.1f} s")


def _status_line(row: dict) -> str:
  def fmt_err(check):
    if not check:
      return ""
    parts = [f"{k} {c['max_abs_err']:.2e}" for k, c in check.items()
             if c.get("max_abs_err") is not None]
    return "err " + ", ".join(parts)
  head = f"{row['workload']:<46} {row['impl']:<16} {row['pass']:<7}"
  if row["status"] in ("skipped", "error"):
    return f"{head} {row['status'].upper()}: {row.get('reason', '')}"
  ms = row.get("median_ms")
  tf = row.get("tflops")
  untimed = "(" + row.get("reason", "untimed") + ")"
  timing = f"{ms:9.3f} ms {tf:8.2f} TF/s" if ms is not None else f"{untimed:<26}"
  flag = "ok" if row["status"] == "ok" else "WRONG"
  return f"{head} {timing}  {flag:5} {fmt_err(row.get('check'))}"


# ------------------------------------------------------------------- main ---

# Run order, by tier (a time budget cuts the last first): per headline
# workload our primary kernel and then cuDNN; our other kernels on the
# headline workloads; the other workloads (their own ours + cuDNN first) and
# the load-balance rows; the baselines (two-launch, jax-pallas-mha, xla).
TIERS = ("headline: ours + cuDNN", "headline: our other kernels",
         "other workloads and load balance", "baselines")
BASELINE_ORDER = (tuple(f"{n}-2launch" for n in report.GROUPED) + ("jax-pallas-mha", "xla"))


@dataclasses.dataclass
class PlanItem:
  """One implementation over every rank of one series (a causal shape: one rank)."""

  series: str
  wls: list
  impl: str
  balance: bool = False    # contiguous rows: only the first implementation that works
  tier: int = 0            # index into TIERS
  unit: int = 0            # items of one unit start together or not at all (ours + cuDNN)
  headline: bool = False  # a headline series (tiers 0 and 1)


@dataclasses.dataclass
class Series:
  """One workload (every rank of a world) and the implementations asked for it."""

  name: str
  wls: list
  impls: list
  balance: bool = False
  headline: int | None = None   # run-order rank among the headline series; None: not one


def plan_series(args, mode: str) -> list[Series]:
  """Every series of the run: the headline ones first, in headline order.

  Headline: HEADLINE_CAUSAL / HEADLINE_ZIGZAG, or every shape and world given
  by --shape / --zigzag (and every smoke shape): what the run is for.
  """
  names = args.impl_names
  kinds = args.workloads
  out = []
  if "causal" in kinds:
    wls = list(args.shape) if args.shape else standard_set(mode)
    for i, wl in enumerate(wls):
      key = (wl.batch, wl.tk, wl.hq, wl.hk, wl.d)
      rank = i if (args.shape or mode == "smoke") else (
          HEADLINE_CAUSAL.index(key) if key in HEADLINE_CAUSAL else None)
      out.append(Series(wl.series, [wl], names, headline=rank))
  worlds = list(args.zigzag) if args.zigzag else zigzag_set(mode)
  heads = zigzag_heads(mode)
  zz = lambda w, s: [common.zigzag_workload(w, s, r, dtype=args.dtype, **heads) for r in range(w)]
  ct = lambda w, s: [common.contiguous_workload(w, s, r, dtype=args.dtype, **heads)
                     for r in range(w)]
  best = [n for n in BALANCE_PREFERENCE if n in names]
  for i, (w, s) in enumerate(worlds):
    rank = i if (args.zigzag or mode == "smoke") else (
        HEADLINE_ZIGZAG.index((w, s)) if (w, s) in HEADLINE_ZIGZAG else None)
    if rank is not None:
      rank += len(HEADLINE_CAUSAL) + len(args.shape or ())
    if "zigzag" in kinds:
      out.append(Series(zz(w, s)[0].series, zz(w, s), names, headline=rank))
    elif "balance" in kinds:   # the zigzag side of the balance table
      out.append(Series(zz(w, s)[0].series, zz(w, s), best, balance=True))
    if "balance" in kinds:
      out.append(Series(ct(w, s)[0].series, ct(w, s), best, balance=True))
  order = {id(s): i for i, s in enumerate(out)}
  return sorted(out, key=lambda s: (s.headline is None, s.headline or 0, order[id(s)]))


def _usable_here(name: str) -> bool:
  try:
    return registry.available(name)
  except ValueError:
    return False


def build_plan(args, mode: str, usable=None) -> list[PlanItem]:
  """(series, implementation) items in run order (see TIERS).

  Our primary kernel is the first of ``report.GROUPED`` (the registry's
  preference order) asked for and ``usable(name)`` (default: it runs on this
  platform); on every series it forms one unit with cuDNN, right after it.
  """
  names = args.impl_names
  usable = usable or _usable_here
  ours = [n for n in report.GROUPED if n in names]
  primary = next((n for n in ours if usable(n)), ours[0] if ours else None)
  keyed = []
  units = itertools.count()

  def item(s: Series, impl: str, tier: int, unit: int) -> PlanItem:
    return PlanItem(s.name, s.wls, impl, s.balance, tier, unit, s.headline is not None)

  for si, s in enumerate(plan_series(args, mode)):
    head = s.headline is not None
    if s.balance:   # in preference order: the first that works settles the series
      keyed += [((2, si, i), item(s, n, 2, next(units))) for i, n in enumerate(s.impls)]
      continue
    pair = [n for n in (primary, "cudnn") if n in s.impls]
    unit = next(units)
    tier = 0 if head else 2
    keyed += [((tier, si, i), item(s, n, tier, unit)) for i, n in enumerate(pair)]
    for i, n in enumerate(n for n in s.impls if n not in pair):
      if n in ours:
        tier = 1 if head else 2
        keyed.append(((tier, si, len(pair) + i), item(s, n, tier, next(units))))
      else:   # baselines: implementation-major (the primary's two-launch first)
        pos = BASELINE_ORDER.index(n) if n in BASELINE_ORDER else len(BASELINE_ORDER)
        keyed.append(((3, pos, si), item(s, n, 3, next(units))))
  return [it for _, it in sorted(keyed, key=lambda kv: kv[0])]


def plan_units(plan: list[PlanItem]) -> list[list[PlanItem]]:
  """Consecutive items of one unit, grouped."""
  out = []
  for item in plan:
    if out and out[-1][0].unit == item.unit:
      out[-1].append(item)
    else:
      out.append([item])
  return out


class Runner:
  """Runs a plan unit by unit within a time budget; rows collect in ``rows``.

  A unit (our primary kernel + cuDNN on one series, else one item) starts only
  if the budget is not spent and its estimate (mean seconds per run so far
  times its runs) fits what is left; a started unit runs to its end unless it
  overruns the budget by a quarter: so a budget cut leaves whole comparisons.
  """

  OVERRUN = 1.25

  def __init__(self, registry_, st: Settings, budget: common.Budget, *, on_item=None, bar=None):
    self.registry = registry_
    self.st = st
    self.budget = budget
    self.store = Inputs(st.sets)
    self.rows = []
    self.run_seconds = []   # wall time of every run that got past its availability check
    self.on_item = on_item or (lambda: None)
    self.bar = bar

  def runnable(self, item: PlanItem, wl: Workload) -> bool:
    return self.registry[item.impl].unavailable(wl, self.st.ctx) is None

  def estimate(self, unit: list[PlanItem]) -> float:
    """Seconds the unit is expected to take (0 before anything ran)."""
    if not self.run_seconds:
      return 0.0
    n = sum(self.runnable(it, wl) for it in unit for wl in it.wls)
    return statistics.fmean(self.run_seconds) * n

  def unit_skip_reason(self, unit: list[PlanItem]) -> str | None:
    left = self.budget.left
    if left is None:
      return None
    if left <= 0:
      return f"time budget ({self.budget.seconds:.0f} s) spent"
    need = self.estimate(unit)
    if need > left:
      return (f"time budget ({self.budget.seconds:.0f} s): this comparison needs ~{need:.0f} s, "
              f"{left:.0f} s left")
    return None

  def overrun(self) -> bool:
    b = self.budget
    return b.seconds is not None and b.elapsed > self.OVERRUN * b.seconds

  def run_one(self, item: PlanItem, wl: Workload) -> list[dict]:
    """Checks and times one rank; prints its rows and where its time went."""
    t0 = time.perf_counter()
    rows = run_item(WorkloadState(wl, self.store), self.registry[item.impl], self.st)
    if any(r["status"] != "skipped" or r.get("phases") for r in rows):
      self.run_seconds.append(time.perf_counter() - t0)
    _print_rows(rows)
    return rows

  def skipped(self, item: PlanItem, wl: Workload, reason: str) -> list[dict]:
    return [_row(wl, self.registry[item.impl], p, reason=reason) for p in self.st.passes]

  def run(self, plan: list[PlanItem]) -> list[dict]:
    for item in plan:
      for wl in item.wls:
        self.store.reserve(wl)
    chosen = {}   # balance series -> the implementation it settled on
    for unit in plan_units(plan):
      unit_reason = None
      if not all(it.balance and it.series in chosen for it in unit):
        unit_reason = self.unit_skip_reason(unit)
        if unit_reason:
          what = " + ".join(it.impl for it in unit)
          log(f"{unit[0].series:<46} {what:<16} {'*':<7} SKIPPED: {unit_reason}")
      for item in unit:
        self._run_item(item, unit_reason, chosen)
        self.on_item()
    return self.rows

  def _run_item(self, item: PlanItem, skip_reason: str | None, chosen: dict) -> None:
    impl = self.registry[item.impl]
    if item.balance and item.series in chosen:   # settled on an earlier implementation
      for wl in item.wls:
        self.store.release(wl)
        self._tick()
      return
    for wl in item.wls:
      if skip_reason is None and self.overrun():
        skip_reason = f"time budget ({self.budget.seconds:.0f} s) overrun: rest of the unit cut"
      if skip_reason is not None:
        rows = self.skipped(item, wl, skip_reason)
      else:
        if self.bar is not None:
          self.bar.set_postfix_str(f"{wl.name} {impl.name}")
        rows = self.run_one(item, wl)
        if wl is item.wls[0] and len(item.wls) > 1:
          # The first rank decides for the others when nothing ran at all.
          if all(r["status"] == "skipped" for r in rows):
            skip_reason = rows[0].get("reason")
          elif all(r["status"] == "error" for r in rows):
            skip_reason = f"rank {wl.rank} failed: {rows[0].get('reason')}"
          elif item.balance and not any(r["status"] == "ok" for r in rows):
            skip_reason = f"rank {wl.rank} gave no correct result"
          if skip_reason:
            log(f"{item.series:<46} {impl.name:<16} other ranks skipped: {skip_reason}")
        if item.balance and any(r["status"] == "ok" for r in rows):
          chosen.setdefault(item.series, impl.name)
      self.rows += rows
      self.store.release(wl)
      self._tick()

  def _tick(self) -> None:
    if self.bar is not None:
      self.bar.update(1)


def expand_impls(backends: list[str]) -> list[str]:
  known = impls.IMPL_NAMES
  out = []
  for b in backends:
    if b == "two-launch":
      out += [f"{k}-2launch" for k in report.GROUPED if k in backends]
    elif b in known:
      out.append(b)
    else:
      raise SystemExit(f"--backends: unknown {b!r}; known: {', '.join(known)}, two-launch")
  return list(dict.fromkeys(out))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="headline shapes: S8192 GQA, D64, D256 causal and zigzag W=8 S=64K, "
                       "then S8192 MHA (~3 min on an H200)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes (the default without a GPU): a correctness check")
  ap.add_argument("--workloads", default="causal,zigzag,balance",
                  help=f"comma list of {', '.join(WORKLOAD_KINDS)}")
  ap.add_argument("--backends",
                  default=",".join(report.GROUPED
                                   + ("xla", "cudnn", "jax-pallas-mha", "two-launch")),
                  help="comma list of implementations: registry entries ("
                       + ", ".join(report.GROUPED) + ", xla), cudnn, jax-pallas-mha, two-launch "
                       "(per-group launches of each kernel backend listed), or explicit "
                       "<backend>-2launch")
  ap.add_argument("--passes", default="fwd,bwd,fwdbwd", help="comma list of fwd, bwd, fwdbwd")
  ap.add_argument("--shape", action="append", type=parse_shape, metavar="BxSxHqxHkxD",
                  help="your causal shape instead of the standard set (repeatable)")
  ap.add_argument("--zigzag", action="append", type=parse_world, metavar="WxS",
                  help="zigzag world size x total sequence instead of the default set")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                  help="dtype of the zigzag/balance workloads (causal sets are bfloat16)")
  ap.add_argument("--reps", type=int, default=None, help="timed repeats (median reported)")
  ap.add_argument("--warmup", type=int, default=None)
  ap.add_argument("--sets", type=int, default=None, help="input sets rotated while timing")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no comparison (ours + cuDNN on one workload, else one row) "
                       "after this many seconds or that would not fit in what is left")
  ap.add_argument("--nvlink-gbps", type=float, default=450.0,
                  help="assumed NVLink bandwidth per GPU, one direction (GB/s) for the model")
  ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
  args = ap.parse_args(argv)
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for w in args.workloads:
    if w not in WORKLOAD_KINDS:
      ap.error(f"--workloads: unknown {w!r}; use {', '.join(WORKLOAD_KINDS)}")
  args.passes = tuple(p for p in common.PASSES if p in args.passes.split(","))
  if not args.passes:
    ap.error("--passes: give at least one of fwd, bwd, fwdbwd")
  if args.budget_s is not None and args.budget_s <= 0:
    ap.error(f"--budget-s must be positive, got {args.budget_s}")
  args.impl_names = expand_impls([b.strip() for b in args.backends.split(",") if b.strip()])
  if args.shape:
    args.shape = [dataclasses.replace(s, dtype=args.dtype) for s in args.shape]
  return args


def _warn_if_gpu_unused() -> None:
  """A GPU the system has but JAX cannot use turns the run into a CPU smoke run:
  say so once (jax_grouped_attn.platform's check, where this version has it)."""
  warn = getattr(ga_platform, "warn_if_gpu_unused", None)
  if warn is not None:
    warn()


def main(argv=None) -> dict:
  args = parse_args(argv)
  _warn_if_gpu_unused()
  gpu = common.on_gpu()
  if not gpu:
    mode = "smoke"
    log("No GPU here: SMOKE mode -- tiny shapes, Pallas/Triton in interpret mode. "
        "This checks correctness of every code path; its timings mean nothing.")
    if args.shape or args.zigzag:
      log("(--shape/--zigzag are kept: keep them tiny on CPU.)")
  else:
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  pick = lambda given, default: default if given is None else given
  reps = max(1, pick(args.reps, {"smoke": 2, "quick": 10, "full": 25}[mode]))
  warmup = max(0, pick(args.warmup, {"smoke": 1, "quick": 1, "full": 3}[mode]))
  sets = max(1, pick(args.sets, 1 if mode == "smoke" else 2))
  st = Settings(args.passes, reps, warmup, sets, impls.Context(gpu=gpu))
  registry_ = impls.all_impls()
  plan = build_plan(args, mode)
  env = common.environment()
  os.makedirs(args.out, exist_ok=True)
  log(f"device: {env['device']} ({env['platform']}); jax {env['jax']}, jaxlib {env['jaxlib']}, "
      f"triton {env['triton']}, jax-triton {env['jax_triton']}, cudnn {env['cudnn']}")
  log(f"mode {mode}: {len({it.series for it in plan})} series, impls "
      f"{', '.join(args.impl_names)}, passes {', '.join(args.passes)}, {reps} reps "
      f"(+{warmup} warmup), {sets} input set(s)")
  heads = [f"{it.series} {it.impl}" for it in plan if it.tier == 0]
  if heads:
    log(f"headline comparisons first: {'; '.join(heads)}")
  results = {
      "environment": env, "mode": mode, "timings_meaningful": gpu and mode != "smoke",
      "settings": {"passes": list(args.passes), "reps": reps, "warmup": warmup, "sets": sets,
                   "impls": args.impl_names, "workloads": args.workloads,
                   "budget_s": args.budget_s, "nvlink_gbps": args.nvlink_gbps},
      "configs": report.kernel_configs(plan),
      "plan": [{"series": it.series, "impl": it.impl, "tier": TIERS[it.tier], "unit": it.unit,
                "ranks": len(it.wls)} for it in plan],
      "rows": [],
  }
  budget = common.Budget(args.budget_s)
  bar = common.progress(total=sum(len(item.wls) for item in plan), desc="bench", unit="run")
  runner = Runner(registry_, st, budget, bar=bar,
                  on_item=lambda: report.write_json(results, args.out))
  results["rows"] = runner.rows
  runner.run(plan)
  bar.close()
  results["elapsed_s"] = budget.elapsed
  report.finish(results, args.out)
  log(f"wrote {os.path.join(args.out, 'bench.json')}, bench.md and plots "
      f"({budget.elapsed:.0f} s)")
  if not results["timings_meaningful"]:
    log("Reminder: no GPU -- the timings above mean nothing; the errors do.")
  return results


if __name__ == "__main__":
  res = main()
  bad = [r for r in res["rows"] if r["status"] == "wrong"]
  sys.exit(1 if bad else 0)
