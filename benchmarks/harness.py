"""The one benchmark harness: check every row against the fp32 oracle, then time it.

``run_item`` runs all passes of one implementation on one workload: compile
(or take the compile started ahead, :func:`compile_run`), check whole tensors
against :func:`benchmarks.common.oracle` with the calibrated rule, then time
(:func:`benchmarks.common.time_calls`: rounds of back-to-back calls over
rotating input sets). ``Runner`` runs a list of ``PlanItem`` (one
implementation over the ranks of one series) unit by unit within a time
budget; inputs and oracles are made once per workload and shared by every
implementation. ``measure`` is the plain front door: every implementation on
every workload, interleaved per workload. ``bench`` builds its workloads and
implementations and hands them here; ``tune``, ``bench_cp`` and ``llama`` use
the same timer and oracle from ``common``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
import traceback

import jax

from benchmarks import common, impls
from benchmarks.common import Workload, log


@dataclasses.dataclass
class Settings:
  passes: tuple
  rounds: int              # timed rounds of back-to-back calls (common.time_calls)
  warmup: int
  sets: int
  ctx: impls.Context
  calls: int | None = None   # calls per round; None: sized to the kernel's time
  compile_threads: int = 0   # threads compiling a unit's runs ahead of them (0: inline)


class Inputs:
  """Global inputs per world (shared by its ranks), per-rank views and oracles.

  A workload is revisited once per implementation (later tiers of the plan
  come back to it): its inputs and oracle are made once and kept until its
  last item ran. ``made`` counts how often each was made (tests check it).
  """

  # Oracles (whole fp32 tensors, both precisions) stay on the device up to
  # this many bytes in all; beyond, they wait in host memory.
  DEVICE_BYTES = 12 << 30

  def __init__(self, sets: int):
    self.sets = sets
    self.device_bytes = 0
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
          if d is self.oracles and isinstance(jax.tree_util.tree_leaves(d[name][1])[0],
                                              jax.Array):
            self.device_bytes -= sum(x.nbytes for x in jax.tree_util.tree_leaves(d[name][1]))
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

  def oracle(self, wl: Workload, spent: dict | None = None) -> dict:
    """The whole-tensor oracle of ``wl`` on input set 0; seconds spent computing it
    go to ``spent["oracle_s"]`` (of which compiling: ``spent["oracle_compile_s"]``)."""
    spent = {} if spent is None else spent
    if wl.name not in self.oracles:
      q, k, v, do = self.inputs(wl, spent)[0]
      timing = {}
      with common.clock(spent, "oracle_s"):
        want = common.oracle(wl, q, k, v, do, timing=timing)
        size = sum(x.nbytes for x in jax.tree_util.tree_leaves(want))
        if self.device_bytes + size > self.DEVICE_BYTES:
          want = jax.device_get(want)
        else:
          self.device_bytes += size
      spent["oracle_compile_s"] = spent.get("oracle_compile_s", 0.0) + timing.get("compile_s", 0.0)
      self.oracles[wl.name] = (wl, want)
      self.made[("oracle", wl.name)] += 1
    return self.oracles[wl.name][1]


class WorkloadState:
  """What run_item needs for one workload: inputs and (lazy) oracle, from the
  shared store; ``spent`` holds the seconds this state's run paid for them (0
  when an earlier run of the workload already had)."""

  def __init__(self, wl: Workload, store: Inputs):
    self.wl = wl
    self.store = store
    self.spent = {"inputs_s": 0.0, "oracle_s": 0.0, "oracle_compile_s": 0.0}
    self.inputs = store.inputs(wl, self.spent)

  @property
  def oracle(self) -> dict:
    return self.store.oracle(self.wl, self.spent)


def blank_row(wl: Workload, impl: impls.Impl, pass_: str, **kw) -> dict:
  row = {
      "workload": wl.name, "series": wl.series, "family": wl.family,
      "world": wl.world, "rank": wl.rank, "seq": wl.seq, "batch": wl.batch,
      "tq": wl.tq, "tk": wl.tk, "hq": wl.hq, "hk": wl.hk, "d": wl.d,
      "dv": wl.dv, "dtype": wl.dtype, "window": wl.window and list(wl.window),
      "groups": [list(dataclasses.astuple(g)) for g in wl.groups],
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


def _measure(row, phases, compiled_of, args, check_of, arg_sets, st: Settings, gate: Gate,
             compile_s: float) -> None:
  """One pass: the compiled executable (``compiled_of()``; ``compile_s`` it took)
  gives the memory analysis, the checked result and the timings: check against
  the oracle, then time. ``check_of(result) -> {name: check}``; phases get
  compile_s, check_s, time_s."""
  phases["compile_s"] = compile_s
  compiled = compiled_of()
  row["memory"] = common.memory_stats(compiled)
  with common.clock(phases, "check_s"):
    result = jax.block_until_ready(compiled(*args))
    checks = check_of(result)
    del result
  row["check"] = checks
  row["ok"] = all(c["ok"] for c in checks.values())
  # The checked call above was the first; warm-up calls touch the other sets.
  with common.clock(phases, "time_s"), gate.time():
    _timed_row(row, common.time_calls(compiled, arg_sets, rounds=st.rounds, warmup=st.warmup,
                                      calls=st.calls))
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


class Gate:
  """Compiles may run side by side; timing runs alone. A compile on another
  thread is CPU work, but XLA may autotune on the GPU while compiling: a
  timing round never overlaps one (it waits for those in flight, and new ones
  wait for it)."""

  def __init__(self):
    self.cv = threading.Condition()
    self.compiling = 0
    self.timing = False

  @contextlib.contextmanager
  def compile(self):
    with self.cv:
      self.cv.wait_for(lambda: not self.timing)
      self.compiling += 1
    try:
      yield
    finally:
      with self.cv:
        self.compiling -= 1
        self.cv.notify_all()

  @contextlib.contextmanager
  def time(self):
    with self.cv:
      self.cv.wait_for(lambda: not self.timing)
      self.timing = True
      self.cv.wait_for(lambda: self.compiling == 0)
    try:
      yield
    finally:
      with self.cv:
        self.timing = False
        self.cv.notify_all()


class Compiled:
  """One run's implementation built and its executables compiled (fwd, fwdbwd):
  each an executable or the exception compiling it raised; ``seconds`` per step."""

  def __init__(self):
    self.built = None
    self.error = None        # impl.build raised
    self.exes = {}
    self.seconds = {}

  @property
  def failed(self) -> bool:
    """Building or a compile raised (NotImplementedError, a refusal, aside)."""
    return self.error is not None or any(
        isinstance(e, BaseException) and not isinstance(e, NotImplementedError)
        for e in self.exes.values())

  def exe(self, pass_: str):
    exe = self.exes[pass_]
    if isinstance(exe, BaseException):
      raise exe
    return exe


def compile_run(wl: Workload, impl: impls.Impl, st: Settings, gate: Gate | None = None) -> Compiled:
  """Builds ``impl`` on ``wl`` and compiles the passes ``st`` asks for, from the
  workload's shapes alone (so another thread can do it ahead of the run)."""
  c = Compiled()
  gate = gate or Gate()
  try:
    with common.clock(c.seconds, "build_s"):
      c.built = impl.build(wl, st.ctx)
  except Exception as e:  # noqa: BLE001 -- reported by run_item
    c.error = (e, traceback.format_exc()[-2000:])
    return c
  q, k, v, do = common.input_shapes(wl)
  fn, fwd_fn = c.built.fn, c.built.fwd_fn or c.built.fn
  jobs = {}
  if "fwd" in st.passes or "bwd" in st.passes:
    jobs["fwd"] = lambda: jax.jit(fwd_fn).lower(q, k, v).compile()
  if "bwd" in st.passes or "fwdbwd" in st.passes:
    jobs["fwdbwd"] = lambda: jax.jit(
        lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do)).lower(q, k, v, do).compile()
  for pass_, job in jobs.items():
    try:
      with gate.compile(), common.clock(c.seconds, f"{pass_}_compile_s"):
        c.exes[pass_] = job()
    except Exception as e:  # noqa: BLE001 -- raised again where the pass is measured
      c.exes[pass_] = e
  return c


def run_item(state: WorkloadState, impl: impls.Impl, st: Settings, compiled=None,
             gate: Gate | None = None) -> list[dict]:
  """All passes of one implementation on one workload: check, then time.

  ``compiled``: a future of :func:`compile_run` started ahead (else it is
  compiled here). Rows carry ``phases`` (seconds): per measured pass
  compile_s (spent compiling, maybe on another thread, ahead), check_s and
  time_s; the first row also build_s, compile_wait_s (what this run waited for
  a compile started ahead), inputs_s and oracle_s (what this run paid for the
  shared inputs and oracle: 0 when cached) and run_s (the whole run).
  """
  t_run = time.perf_counter()
  wl = state.wl
  gate = gate or Gate()
  reason = impl.unavailable(wl, st.ctx)
  if reason:
    return [blank_row(wl, impl, p, reason=reason) for p in st.passes]
  setup = {}
  with common.clock(setup, "compile_wait_s"):
    c = compiled.result() if compiled is not None else compile_run(wl, impl, st, gate)
  if compiled is None:
    setup.pop("compile_wait_s")
  elif c.failed:
    # Whatever failed on another thread is compiled again here, so a compile
    # that is not thread-safe costs time, never a false error.
    c = compile_run(wl, impl, st, gate)
    setup["compiled_again"] = 1.0
  setup["build_s"] = c.seconds.get("build_s", 0.0)
  if c.error is not None:
    e, tb = c.error
    return [blank_row(wl, impl, p, status="error", reason=_error_text(e), traceback=tb)
            for p in st.passes]
  built = c.built
  want_grad = "bwd" in st.passes or "fwdbwd" in st.passes
  rows = {}
  q, k, v, do = state.inputs[0]
  factor = built.tolerance_factor

  # Forward: for its own row and for bwd = fwdbwd - fwd. It returns the lse too
  # where the implementation's API gives it in fp32 (Built.fwd_fn).
  fwd_row = blank_row(wl, impl, "fwd", note=built.note)

  def fwd_checks(result):
    out, lse = result if isinstance(result, tuple) else (result, None)
    checks = {"out": common.compare(out, state.oracle, "out", factor)}
    if lse is not None:
      checks["lse"] = common.compare(lse, state.oracle, "lse", factor)
    return checks

  if "fwd" in st.passes or "bwd" in st.passes:
    _guarded(fwd_row, state, lambda ph: _measure(
        fwd_row, ph, lambda: c.exe("fwd"), (q, k, v), fwd_checks,
        [s[:3] for s in state.inputs], st, gate, c.seconds.get("fwd_compile_s", 0.0)))
    rows["fwd"] = fwd_row

  if want_grad:
    fb_row = blank_row(wl, impl, "fwdbwd", note=built.note)

    def grad_checks(grads):
      return {name: common.compare(g, state.oracle, name, factor)
              for name, g in zip(("dq", "dk", "dv"), grads)}

    _guarded(fb_row, state, lambda ph: _measure(
        fb_row, ph, lambda: c.exe("fwdbwd"), (q, k, v, do), grad_checks, state.inputs, st,
        gate, c.seconds.get("fwdbwd_compile_s", 0.0)))
    if fb_row.get("status") not in ("skipped", "error") and not built.grad_exact:
      fb_row["note"] = built.note
    rows["fwdbwd"] = fb_row
    bwd_row = blank_row(wl, impl, "bwd", note=built.note)
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


def _print_rows(rows: list[dict], verbose: bool = True) -> None:
  """One line per pass (one in all for an implementation skipped whole) and
  where the run's time went; not ``verbose``: only rows that are wrong or failed."""
  if not verbose:
    for r in rows:
      if r["status"] in ("wrong", "error"):
        log(_status_line(r))
    return
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
    parts = [f"{k} {c['max_err']:.1e}" for k, c in check.items() if c.get("max_err") is not None]
    parts += [f"{k}: {c['why']}" for k, c in check.items() if c.get("why")]
    return "max err/scale " + ", ".join(parts)
  head = f"{row['workload']:<46} {row['impl']:<16} {row['pass']:<7}"
  if row["status"] in ("skipped", "error"):
    return f"{head} {row['status'].upper()}: {row.get('reason', '')}"
  ms = row.get("median_ms")
  tf = row.get("tflops")
  untimed = "(" + row.get("reason", "untimed") + ")"
  timing = (f"{ms:9.3f} ms {tf:7.1f} TF/s ±{100 * row.get('spread', 0):.0f}%"
            if ms is not None else f"{untimed:<30}")
  flag = "ok" if row["status"] == "ok" else "WRONG"
  return f"{head} {timing}  {flag:5} {fmt_err(row.get('check'))}"


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


def plan_units(plan: list[PlanItem]) -> list[list[PlanItem]]:
  """Consecutive items of one unit, grouped."""
  out = []
  for item in plan:
    if out and out[-1][0].unit == item.unit:
      out[-1].append(item)
    else:
      out.append([item])
  return out


# Seconds one run (one implementation, one rank, every pass) takes before any
# run of this process calibrates them: on an H100 (2026-12-07), a Mosaic
# kernel's run ~8 s (its compiles dominate), cuDNN's ~3 s, per-group launches
# as many kernels. The first run of a workload also pays its oracle: ~2 s to
# compile one per shape (ranks of a world share it) and ~2.5e-12 s per logit
# element and unit of head_dim (Tq x Tk x Hq x B x D; 0.67 s at S8192 Hq32 D128).
PRIOR_RUN_S = {"grouped": 8.0, "two-launch": 8.0, "cudnn": 3.0, "reference": 3.0, "other": 2.0}
PRIOR_ORACLE_S = (2.0, 2.5e-12)


def prior_seconds(impl: impls.Impl, wl: Workload, with_oracle: bool) -> float:
  """A priori seconds of one run of ``impl`` on ``wl`` (PRIOR_RUN_S), with its
  workload's oracle (:func:`prior_oracle_seconds`, compiled anew) if ``with_oracle``."""
  run = PRIOR_RUN_S.get(impl.kind, PRIOR_RUN_S["other"])
  if impl.kind == "two-launch":
    run *= max(1, sum(g.q_len > 0 for g in wl.groups))
  return run + (prior_oracle_seconds(wl, True) if with_oracle else 0.0)


def prior_oracle_seconds(wl: Workload, compile: bool) -> float:
  base, per_elem = PRIOR_ORACLE_S
  return (base if compile else 0.0) + per_elem * wl.tq * wl.tk * wl.hq * wl.batch * wl.d


def oracle_shape(wl: Workload) -> tuple:
  """What one compiled oracle serves: workloads that differ only in their groups."""
  return common.global_key(wl) + (wl.tq, wl.causal, wl.window, wl.softcap, wl.sinks)


class Runner:
  """Runs a plan unit by unit within a time budget; rows collect in ``rows``.

  A unit (our primary kernel + cuDNN on one series, else one item) starts only
  if the budget is not spent and its estimate fits what is left (a headline
  comparison: what is left plus the overrun allowance); a started unit runs
  to its end unless it overruns the budget by a quarter: so a budget cut
  leaves whole comparisons. The estimate is :func:`prior_seconds` per run,
  scaled by what the runs so far took against their priors (per kind of
  implementation once one of that kind ran). Headline comparisons (tier 0)
  come first; once one of them is cut, nothing of a later tier starts: no
  other row runs in a headline's place.
  """

  OVERRUN = 1.25

  def __init__(self, registry_, st: Settings, budget: common.Budget, *, on_item=None, bar=None,
               verbose: bool = False):
    self.registry = registry_
    self.st = st
    self.budget = budget
    self.store = Inputs(st.sets)
    self.rows = []
    self.observed = collections.defaultdict(lambda: [0.0, 0.0])   # kind -> [seconds, prior]
    self.oracled = set()    # workloads (and oracle shapes) a run has paid the oracle of
    self.headline_cut = None
    self.units_cut = 0      # non-headline units the budget cut (printed as one count)
    self.on_item = on_item or (lambda: None)
    self.bar = bar
    self.verbose = verbose
    self.gate = Gate()
    self.pool = (concurrent.futures.ThreadPoolExecutor(st.compile_threads)
                 if st.compile_threads > 0 else None)
    self.compiles = {}      # (impl, workload) -> future of compile_run, started ahead

  def runnable(self, item: PlanItem, wl: Workload) -> bool:
    return self.registry[item.impl].unavailable(wl, self.st.ctx) is None

  def _calibration(self, kind: str) -> float:
    seconds, prior = self.observed.get(kind, (0.0, 0.0))
    if prior > 0:
      return seconds / prior
    total_s = sum(v[0] for v in self.observed.values())
    total_p = sum(v[1] for v in self.observed.values())
    return total_s / total_p if total_p > 0 else 1.0

  def estimate(self, unit: list[PlanItem], oracled: set | None = None) -> float:
    """Seconds the unit is expected to take. ``oracled``: workloads whose oracle
    is already paid for (default: this runner's), updated with the unit's."""
    oracled = set(self.oracled) if oracled is None else oracled
    total = 0.0
    for it in unit:
      impl = self.registry[it.impl]
      for wl in it.wls:
        if not self.runnable(it, wl):
          continue
        total += prior_seconds(impl, wl, False) * self._calibration(impl.kind)
        if wl.name not in oracled:
          fresh = oracle_shape(wl) not in oracled
          total += prior_oracle_seconds(wl, fresh) * self._calibration("oracle")
          oracled.update((wl.name, oracle_shape(wl)))
    return total

  def headline_estimates(self, plan: list[PlanItem]) -> list[tuple[str, float]]:
    """(what, estimated seconds) of every headline comparison (tier-0 unit), a priori."""
    oracled = set(self.oracled)
    return [(f"{u[0].series}: {' + '.join(it.impl for it in u)}", self.estimate(u, oracled))
            for u in plan_units(plan) if u[0].tier == 0]

  def unit_skip_reason(self, unit: list[PlanItem]) -> str | None:
    if unit[0].tier > 0 and self.headline_cut:
      return (f"a headline comparison ({self.headline_cut}) did not fit the time budget: "
              "nothing else runs in its place")
    left = self.budget.left
    if left is None:
      return None
    if left <= 0:
      return f"time budget ({self.budget.seconds:.0f} s) spent"
    need = self.estimate(unit)
    # A headline comparison may also use the overrun allowance (it is what the
    # run is for); anything else must fit what is left of the budget itself.
    allowed = left + ((self.OVERRUN - 1.0) * self.budget.seconds if unit[0].tier == 0 else 0.0)
    if need > allowed:
      return (f"time budget ({self.budget.seconds:.0f} s): this comparison needs ~{need:.0f} s, "
              f"{left:.0f} s left")
    return None

  def overrun(self) -> bool:
    b = self.budget
    return b.seconds is not None and b.elapsed > self.OVERRUN * b.seconds

  def run_one(self, item: PlanItem, wl: Workload) -> list[dict]:
    """Checks and times one rank; prints its rows (``verbose``: and where its time
    went, else only rows that are wrong or failed)."""
    t0 = self.budget.clock()
    rows = run_item(WorkloadState(wl, self.store), self.registry[item.impl], self.st,
                    compiled=self.compiles.pop((item.impl, wl.name), None), gate=self.gate)
    if any(r["status"] != "skipped" or r.get("phases") for r in rows):
      ph = next((r["phases"] for r in rows if "run_s" in (r.get("phases") or {})), {})
      self.record(item, wl, self.budget.clock() - t0,
                  oracle_s=ph.get("oracle_s", 0.0) + ph.get("inputs_s", 0.0))
    _print_rows(rows, self.verbose)
    return rows

  def compile_ahead(self, unit: list[PlanItem]) -> None:
    """Starts compiling every run of ``unit`` on the pool (in run order), so each
    compiles while earlier runs check and time on the GPU."""
    if self.pool is None:
      return
    for it in unit:
      impl = self.registry[it.impl]
      for wl in it.wls:
        key = (it.impl, wl.name)
        if key not in self.compiles and impl.unavailable(wl, self.st.ctx) is None:
          self.compiles[key] = self.pool.submit(compile_run, wl, impl, self.st, self.gate)

  def record(self, item: PlanItem, wl: Workload, seconds: float, oracle_s: float = 0.0) -> None:
    """A run that took ``seconds``, ``oracle_s`` of them for its workload's inputs
    and oracle: it calibrates the estimates of later ones."""
    impl = self.registry[item.impl]
    obs = self.observed[impl.kind]
    obs[0] += seconds - oracle_s
    obs[1] += prior_seconds(impl, wl, False)
    if wl.name not in self.oracled:
      self.observed["oracle"][0] += oracle_s
      self.observed["oracle"][1] += prior_oracle_seconds(wl, oracle_shape(wl) not in self.oracled)
      self.oracled.update((wl.name, oracle_shape(wl)))

  def skipped(self, item: PlanItem, wl: Workload, reason: str) -> list[dict]:
    return [blank_row(wl, self.registry[item.impl], p, reason=reason) for p in self.st.passes]

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
          if unit[0].tier == 0 and self.headline_cut is None:
            self.headline_cut = unit[0].series
          if unit[0].tier == 0 or self.verbose:
            what = " + ".join(it.impl for it in unit)
            log(f"SKIPPED {unit[0].series} {what}: {unit_reason}")
          else:
            self.units_cut += 1
      if unit_reason is None:
        self.compile_ahead(unit)
      for item in unit:
        self._run_item(item, unit_reason, chosen)
        self.on_item()
    for fut in self.compiles.values():   # a unit cut short: its compiles are not needed
      fut.cancel()
    self.compiles.clear()
    if self.pool is not None:
      self.pool.shutdown(wait=True)
    if self.units_cut:
      log(f"SKIPPED {self.units_cut} other comparisons for the time budget "
          + ("(a headline did not fit) " if self.headline_cut else "") + "; bench.md lists them")
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
          if skip_reason and self.verbose:
            log(f"{item.series:<46} {impl.name:<16} other ranks skipped: {skip_reason}")
        if item.balance and any(r["status"] == "ok" for r in rows):
          chosen.setdefault(item.series, impl.name)
      self.rows += rows
      self.store.release(wl)
      self._tick()

  def _tick(self) -> None:
    if self.bar is not None:
      self.bar.update(1)




def measure(items, st: Settings, *, rows=None, registry_=None, budget=None,
            on_item=None) -> list[dict]:
  """``items``: (workload, implementation name) pairs, run in that order, each
  its own unit. Returns the rows of :func:`run_item`, every one checked,
  appended to ``rows`` (a list the caller may save after each item)."""
  registry_ = impls.all_impls() if registry_ is None else registry_
  plan = [PlanItem(wl.series, [wl], name, unit=i) for i, (wl, name) in enumerate(items)]
  runner = Runner(registry_, st, budget or common.Budget(None), on_item=on_item)
  if rows is not None:
    runner.rows = rows
  return runner.run(plan)
