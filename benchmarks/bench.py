"""Which attention implementation is fastest for my shape, and by how much?

  python -m benchmarks.bench                  # full GPU sweep (or CPU smoke)
  python -m benchmarks.bench --quick          # headline shapes, ~3 min on an H100
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
import json
import math
import os
import sys
import traceback

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, impls, report  # noqa: E402
from benchmarks.common import Workload, log  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORKLOAD_KINDS = ("causal", "zigzag", "balance")
BALANCE_PREFERENCE = report.GROUPED + ("cudnn", "xla")


# ------------------------------------------------------------- workloads ---

def standard_set(mode: str) -> list[Workload]:
  cw = common.causal_workload
  if mode == "smoke":
    return [cw(1, 64, 2, 2, 32), cw(2, 48, 4, 2, 64)]
  if mode == "quick":
    return [cw(1, 8192, 32, 32, 128), cw(1, 8192, 32, 8, 128)]
  return [cw(1, 2048, 32, 8, 128), cw(1, 8192, 32, 32, 128), cw(1, 8192, 32, 8, 128),
          cw(1, 32768, 32, 8, 128), cw(4, 4096, 16, 16, 64), cw(1, 8192, 16, 16, 256)]


def zigzag_set(mode: str) -> list[tuple[int, int]]:
  """(world size, total sequence) pairs."""
  if mode == "smoke":
    return [(2, 128), (4, 128)]
  if mode == "quick":
    return [(8, 65536)]
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

  Series run implementation-major, so a rank is revisited once per
  implementation: its inputs and oracle are kept until its last item ran.
  """

  def __init__(self, sets: int):
    self.sets = sets
    self.globals = {}
    self.local = {}
    self.oracles = {}
    self.pending = collections.Counter()

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

  def inputs(self, wl: Workload):
    key = common.global_key(wl)
    if key not in self.globals:
      self.globals[key] = [common.make_global_inputs(wl, seed) for seed in range(self.sets)]
    if wl.name not in self.local:
      self.local[wl.name] = (wl, [common.local_inputs(wl, g) for g in self.globals[key]])
    return self.local[wl.name][1]

  def oracle(self, wl: Workload):
    if wl.name not in self.oracles:
      sel = common.selection(wl)
      q, k, v, do = self.inputs(wl)[0]
      self.oracles[wl.name] = (wl, sel, jax.device_get(common.oracle(wl, q, k, v, do, sel)))
    return self.oracles[wl.name][1:]


class WorkloadState:
  """What run_item needs for one workload: inputs, selection and (lazy) oracle."""

  def __init__(self, wl: Workload, store: Inputs):
    self.wl = wl
    self.store = store
    self.inputs = store.inputs(wl)
    self.sel = common.selection(wl)

  @property
  def oracle(self):
    return self.store.oracle(self.wl)[1]


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


def run_item(state: WorkloadState, impl: impls.Impl, st: Settings) -> list[dict]:
  """All passes of one implementation on one workload: check, then time."""
  wl = state.wl
  reason = impl.unavailable(wl, st.ctx)
  want_grad = "bwd" in st.passes or "fwdbwd" in st.passes
  if reason:
    return [_row(wl, impl, p, reason=reason) for p in st.passes]
  try:
    built = impl.build(wl, st.ctx)
  except Exception as e:  # noqa: BLE001
    return [_row(wl, impl, p, status="error", reason=_error_text(e),
                 traceback=traceback.format_exc()[-2000:]) for p in st.passes]
  rows = {}
  q, k, v, do = state.inputs[0]

  # Forward (always timed when a gradient pass is asked: bwd = fwdbwd - fwd).
  fwd_row = _row(wl, impl, "fwd", note=built.note)
  try:
    compiled = jax.jit(built.fn).lower(q, k, v).compile()
    fwd_row["memory"] = common.memory_stats(compiled)
    out = compiled(q, k, v)
    factor = built.tolerance_factor
    check = common.compare(state.sel.q(out), state.oracle, "out", factor)
    del out
    fwd_row["check"] = {"out": check}
    fwd_row["ok"] = check["ok"]
    timing = common.time_calls(compiled, [s[:3] for s in state.inputs],
                               reps=st.reps, warmup=st.warmup)
    _timed_row(fwd_row, timing)
    fwd_row["status"] = "ok" if check["ok"] else "wrong"
    del compiled
  except NotImplementedError as e:
    fwd_row.update(status="skipped", reason=_error_text(e))
  except Exception as e:  # noqa: BLE001
    fwd_row.update(status="error", reason=_error_text(e),
                   traceback=traceback.format_exc()[-2000:])
  rows["fwd"] = fwd_row

  if want_grad:
    fb_row = _row(wl, impl, "fwdbwd", note=built.note)
    try:
      fn = built.fn
      fb = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
      compiled = fb.lower(q, k, v, do).compile()
      fb_row["memory"] = common.memory_stats(compiled)
      grads = compiled(q, k, v, do)
      want = state.oracle
      checks = {
          "dq": common.compare(state.sel.q(grads[0]), want, "dq", built.tolerance_factor),
          "dk": common.compare(state.sel.kv(grads[1]), want, "dk", built.tolerance_factor),
          "dv": common.compare(state.sel.kv(grads[2]), want, "dv", built.tolerance_factor),
      }
      del grads
      fb_row["check"] = checks
      fb_row["ok"] = all(c["ok"] for c in checks.values())
      if not built.grad_exact:
        fb_row["note"] = built.note
      timing = common.time_calls(compiled, state.inputs, reps=st.reps, warmup=st.warmup)
      _timed_row(fb_row, timing)
      fb_row["status"] = "ok" if fb_row["ok"] else "wrong"
      del compiled
    except NotImplementedError as e:
      fb_row.update(status="skipped", reason=_error_text(e))
    except Exception as e:  # noqa: BLE001
      fb_row.update(status="error", reason=_error_text(e),
                    traceback=traceback.format_exc()[-2000:])
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
  return [rows[p] for p in st.passes if p in rows]


def _print_rows(rows: list[dict]) -> None:
  """One line per pass; one line in all for an implementation skipped whole."""
  reasons = {(r["status"], r.get("reason")) for r in rows}
  if len(reasons) == 1 and rows[0]["status"] == "skipped":
    r = rows[0]
    log(f"{r['workload']:<46} {r['impl']:<16} {'*':<7} SKIPPED: {r.get('reason', '')}")
    return
  for r in rows:
    log(_status_line(r))


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
  timing = f"{ms:9.3f} ms {tf:8.2f} TF/s" if ms is not None else f"{'(' + row.get('reason', 'untimed') + ')':<26}"
  flag = "ok" if row["status"] == "ok" else "WRONG"
  return f"{head} {timing}  {flag:5} {fmt_err(row.get('check'))}"


# ------------------------------------------------------------------- main ---

# Run order: the headline comparisons first, so a time budget cuts the least
# important rows (every implementation over every series before the next one).
IMPL_PRIORITY = tuple(dict.fromkeys(
    report.GROUPED[:1] + ("cudnn",) + tuple(f"{n}-2launch" for n in report.GROUPED[:1])
    + report.GROUPED + ("jax-pallas-mha",) + tuple(f"{n}-2launch" for n in report.GROUPED)
    + ("xla",)))


@dataclasses.dataclass
class PlanItem:
  """One implementation over every rank of one series (a causal shape: one rank)."""

  series: str
  wls: list
  impl: str
  balance: bool = False    # contiguous rows: only the first implementation that works

  @property
  def priority(self) -> float:
    p = IMPL_PRIORITY.index(self.impl) if self.impl in IMPL_PRIORITY else len(IMPL_PRIORITY)
    if self.balance:   # contiguous sharding after the zigzag headline comparisons
      p = max(p, IMPL_PRIORITY.index("triton-2launch")) + 0.5
    return p


def build_plan(args, mode: str) -> list[PlanItem]:
  """(series, implementation) items in run order."""
  names = args.impl_names
  series = []      # (series name, workloads, implementation names, balance?)
  kinds = args.workloads
  if "causal" in kinds:
    for wl in (list(args.shape) if args.shape else standard_set(mode)):
      series.append((wl.series, [wl], names, False))
  worlds = list(args.zigzag) if args.zigzag else zigzag_set(mode)
  heads = zigzag_heads(mode)
  zz = lambda w, s: [common.zigzag_workload(w, s, r, dtype=args.dtype, **heads) for r in range(w)]
  ct = lambda w, s: [common.contiguous_workload(w, s, r, dtype=args.dtype, **heads)
                     for r in range(w)]
  best = [n for n in BALANCE_PREFERENCE if n in names]
  for w, s in worlds:
    if "zigzag" in kinds:
      series.append((zz(w, s)[0].series, zz(w, s), names, False))
    elif "balance" in kinds:   # the zigzag side of the balance table
      series.append((zz(w, s)[0].series, zz(w, s), best, True))
    if "balance" in kinds:
      series.append((ct(w, s)[0].series, ct(w, s), best, True))
  plan = [PlanItem(name, wls, impl, bal) for name, wls, impls_, bal in series for impl in impls_]
  order = {name: i for i, (name, *_) in enumerate(series)}
  return sorted(plan, key=lambda it: (it.priority, order[it.series]))


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
                  help="headline shapes only: S8192 causal and zigzag W=8 S=64K (~3 min on H100)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes (the default without a GPU): a correctness check")
  ap.add_argument("--workloads", default="causal,zigzag,balance",
                  help=f"comma list of {', '.join(WORKLOAD_KINDS)}")
  ap.add_argument("--backends",
                  default=",".join(report.GROUPED + ("xla", "cudnn", "jax-pallas-mha", "two-launch")),
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
                  help="stop starting new measurements after this many seconds")
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
  args.impl_names = expand_impls([b.strip() for b in args.backends.split(",") if b.strip()])
  if args.shape:
    args.shape = [dataclasses.replace(s, dtype=args.dtype) for s in args.shape]
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
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
  warmup = max(0, pick(args.warmup, {"smoke": 1, "quick": 2, "full": 3}[mode]))
  sets = max(1, pick(args.sets, 1 if mode == "smoke" else 2))
  st = Settings(args.passes, reps, warmup, sets, impls.Context(gpu=gpu))
  registry = impls.all_impls()
  plan = build_plan(args, mode)
  env = common.environment()
  os.makedirs(args.out, exist_ok=True)
  log(f"device: {env['device']} ({env['platform']}); jax {env['jax']}, jaxlib {env['jaxlib']}, "
      f"triton {env['triton']}, jax-triton {env['jax_triton']}, cudnn {env['cudnn']}")
  log(f"mode {mode}: {len({it.series for it in plan})} series, impls {', '.join(args.impl_names)}, passes "
      f"{', '.join(args.passes)}, {reps} reps (+{warmup} warmup), {sets} input set(s)")
  results = {
      "environment": env, "mode": mode, "timings_meaningful": gpu and mode != "smoke",
      "settings": {"passes": list(args.passes), "reps": reps, "warmup": warmup, "sets": sets,
                   "impls": args.impl_names, "workloads": args.workloads,
                   "budget_s": args.budget_s, "nvlink_gbps": args.nvlink_gbps},
      "configs": report.kernel_configs(plan),
      "rows": [],
  }
  budget = common.Budget(args.budget_s)
  store = Inputs(sets)
  for item in plan:
    for wl in item.wls:
      store.reserve(wl)
  n_total = sum(len(item.wls) for item in plan)
  bar = common.progress(total=n_total, desc="bench", unit="run")
  chosen = {}   # balance series -> the implementation it settled on
  for item in plan:
    impl = registry[item.impl]
    skip_reason = None
    if item.balance and item.series in chosen:   # settled on an earlier implementation
      for wl in item.wls:
        store.release(wl)
      bar.update(len(item.wls))
      continue
    for wl in item.wls:
      if skip_reason is None and budget.exhausted:
        skip_reason = f"time budget ({args.budget_s:.0f} s) spent"
      if skip_reason is not None:
        rows = [_row(wl, impl, p, reason=skip_reason) for p in args.passes]
      else:
        bar.set_postfix_str(f"{wl.name} {impl.name}")
        rows = run_item(WorkloadState(wl, store), impl, st)
        _print_rows(rows)
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
      results["rows"] += rows
      store.release(wl)
      bar.update(1)
    report.write_json(results, args.out)
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
