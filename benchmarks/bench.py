"""Which attention implementation is fastest for my shape, and by how much?

  python -m benchmarks.bench                  # full GPU sweep (or CPU smoke)
  python -m benchmarks.bench --quick          # headline shapes, ~3 min on an H200
  python -m benchmarks.bench --shape 1x8192x32x8x128 --zigzag 8x65536
  python -m benchmarks.bench --shape 1x8192x16x16x192 --dv 128   # MLA: v head_dim 128
  python benchmarks/bench.py --workloads causal --backends triton,cudnn
  python -m benchmarks.bench --workloads window --window 1024 --window-seqs 8192,32768

All implementations run in one process on the same inputs. Every row is first
checked against an exact fp32 oracle over whole tensors (every batch row, head
and query row), then timed (common.time_calls): per-call time, the median over
rounds of back-to-back calls with one device sync per round, over rotating
input sets. Passes: fwd, fwdbwd
(grads of q, k, v under a random cotangent, via jax.vjp) and bwd = fwdbwd - fwd.
TFLOP/s count visible (query, key) pairs only: 2 * pairs * head_dim per matmul
per (batch, head), each matmul at its own head_dim (q/k's D or v's Dv): 2 matmuls
forward (4 * pairs * D at Dv = D), 7 for fwd+bwd (3.5x).

``--workloads window`` (not run by default): is sliding-window attention linear
in S? Per S, ours and cuDNN with a left window, and our primary kernel
without it (quadratic, for contrast); bench.md gets their times per S and
least-squares fits time = a + b * S, and bench_window.png the curves.

Without a GPU the same command runs tiny shapes in interpret mode: a
correctness check of every code path. Its timings mean nothing.

Writes bench.json, bench.md and PNG plots to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import common, impls, report  # noqa: E402
from benchmarks.common import Workload, log  # noqa: E402
from benchmarks.harness import PlanItem, Runner, Settings  # noqa: E402
from jax_grouped_attn import (
  platform as ga_platform,  # noqa: E402
  registry,  # noqa: E402
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORKLOAD_KINDS = ("causal", "zigzag", "balance", "window")
DEFAULT_WORKLOADS = ("causal", "zigzag", "balance")
BALANCE_PREFERENCE = report.GROUPED + ("cudnn", "xla")
DEFAULT_BACKENDS = report.GROUPED + ("xla", "cudnn", "jax-pallas-mha", "two-launch", "padv")
# The CPU smoke run checks our kernels, the reference and the plan in about a
# minute; the baselines' CPU paths have tests of their own (tests/test_bench_smoke.py).
SMOKE_BACKENDS = report.GROUPED + ("xla", "cudnn")


# ------------------------------------------------------------- workloads ---

# The comparisons a run exists for, in run order: causal GQA, D64 and D256
# shapes (B, S, Hq, Hk, D), then zigzag worlds (W, S). Ours and cuDNN on each
# of these run before anything else, so a time budget cuts the rest first.
HEADLINE_CAUSAL = ((1, 8192, 32, 8, 128), (4, 4096, 16, 16, 64), (1, 8192, 16, 16, 256))
HEADLINE_ZIGZAG = ((8, 65536),)


def standard_set(mode: str) -> list[Workload]:
  cw = common.causal_workload
  if mode == "smoke":
    return [cw(2, 48, 4, 2, 32)]
  headline = [cw(*shape) for shape in HEADLINE_CAUSAL]
  if mode == "quick":
    return headline + [cw(1, 8192, 32, 32, 128)]
  return [cw(1, 2048, 32, 8, 128), cw(1, 8192, 32, 32, 128), headline[0],
          cw(1, 32768, 32, 8, 128), headline[1], headline[2]]


def zigzag_set(mode: str) -> list[tuple[int, int]]:
  """(world size, total sequence) pairs."""
  if mode == "smoke":
    return [(2, 128)]
  if mode == "quick":
    return list(HEADLINE_ZIGZAG)
  # Weak scaling (8K local tokens per rank) plus a sequence sweep at W=8.
  return [(2, 16384), (4, 32768), (8, 65536), (16, 131072), (8, 16384), (8, 131072)]


def zigzag_heads(mode: str) -> dict:
  return dict(hq=4, hk=2, d=32) if mode == "smoke" else dict(hq=32, hk=8, d=128)


# The window family: S sweep at the headline GQA shape's heads (B1), window 1024.
WINDOW_SEQS = (8192, 16384, 32768, 65536)
WINDOW_LEFT = 1024
WINDOW_SMOKE = dict(seqs=(64, 128), left=16, heads=(4, 2, 32))


def window_params(args, mode: str) -> tuple[int, list[int]]:
  """(left window, sequence lengths) of the window family: the flags, else the
  mode's defaults."""
  smoke = mode == "smoke"
  left = args.window if args.window is not None else (
      WINDOW_SMOKE["left"] if smoke else WINDOW_LEFT)
  seqs = args.window_seqs or list(WINDOW_SMOKE["seqs"] if smoke else WINDOW_SEQS)
  return left, seqs


def window_set(args, mode: str) -> list[tuple[Workload, Workload]]:
  """Per S: (the causal workload with the left window, the same without it)."""
  left, seqs = window_params(args, mode)
  hq, hk, d = WINDOW_SMOKE["heads"] if mode == "smoke" else HEADLINE_CAUSAL[0][2:]
  cw = lambda s, window: common.causal_workload(1, s, hq, hk, d, args.dtype, family="window",
                                                window=window)
  return [(cw(s, (left, 0)), cw(s, None)) for s in seqs]


def parse_shape(text: str) -> Workload:
  try:
    b, s, hq, hk, d = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--shape {text!r}: expected BxSxHqxHkxD, e.g. 1x8192x32x8x128") from None
  return common.causal_workload(b, s, hq, hk, d, family="custom")


def parse_seqs(text: str) -> list[int]:
  try:
    seqs = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    seqs = []
  if not seqs or min(seqs) < 1:
    raise argparse.ArgumentTypeError(
        f"--window-seqs {text!r}: expected positive sequence lengths, e.g. 8192,16384")
  return seqs


def parse_world(text: str) -> tuple[int, int]:
  try:
    w, s = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--zigzag {text!r}: expected WxS, e.g. 8x65536") from None
  if w < 1 or s % (2 * w):
    raise argparse.ArgumentTypeError(f"--zigzag {text!r}: S must be divisible by 2*W")
  return w, s


# ------------------------------------------------------------------- main ---

# common.time_calls per mode: rounds of back-to-back calls (calls None: sized
# to ~25 ms a round), warm-up calls first. tests/test_bench_timer_gpu.py pins
# the quick setting against an independent measure of device time.
TIMING = {"smoke": {"rounds": 2, "warmup": 0, "calls": 1},
          "quick": {"rounds": 5, "warmup": 1, "calls": None},
          "full": {"rounds": 9, "warmup": 2, "calls": None}}

# Run order, by tier (a time budget cuts the last first): per headline
# workload our primary kernel and then cuDNN; our other kernels on the
# headline workloads; the other workloads (their own ours + cuDNN first) and
# the load-balance rows; the baselines (two-launch, jax-pallas-mha, xla).
TIERS = ("headline: ours + cuDNN", "headline: our other kernels",
         "other workloads and load balance", "baselines")
BASELINE_ORDER = (tuple(f"{n}-2launch" for n in report.GROUPED) + ("jax-pallas-mha", "xla"))


@dataclasses.dataclass
class Series:
  """One workload (every rank of a world) and the implementations asked for it."""

  name: str
  wls: list
  impls: list
  balance: bool = False
  headline: int | None = None   # run-order rank among the headline series; None: not one
  primary_only: bool = False    # only our primary kernel (the window family's contrast)


def offered(names: list[str], dv: int | None) -> list[str]:
  """``names`` less the padded-v workarounds where v has q/k's head_dim (``dv`` None)."""
  return names if dv is not None else [n for n in names if not n.endswith("+padv")]


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
      out.append(Series(wl.series, [wl], offered(names, wl.dv), headline=rank))
      # The same call with each variant asked for, right after it (its cost);
      # a v head_dim equal to D is the call itself.
      variants = ([{"softcap": args.softcap}] if args.softcap is not None else []) + (
          [{"sinks": True}] if args.sinks else []) + (
          [{"dv": args.dv}] if args.dv not in (None, wl.d) else [])
      for twin in (dataclasses.replace(wl, **v) for v in variants):
        out.append(Series(twin.series, [twin], offered(names, twin.dv), headline=rank))
  worlds = list(args.zigzag) if args.zigzag else zigzag_set(mode)
  heads = zigzag_heads(mode)
  zz = lambda w, s: [common.zigzag_workload(w, s, r, dtype=args.dtype, **heads) for r in range(w)]
  ct = lambda w, s: [common.contiguous_workload(w, s, r, dtype=args.dtype, **heads)
                     for r in range(w)]
  best = [n for n in BALANCE_PREFERENCE if n in names]
  names = offered(names, None)   # zigzag and balance workloads: one head_dim
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
  if "window" in kinds:
    for windowed, full in window_set(args, mode):
      out.append(Series(windowed.series, [windowed], names))
      out.append(Series(full.series, [full], names, primary_only=True))
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
  platform); on every series it forms one unit with cuDNN, right after it
  (with a v head_dim of its own: both with their padded-v workarounds).
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
    tier = 0 if head else 2
    if s.primary_only:
      if primary in s.impls:
        keyed.append(((tier, si, 0), item(s, primary, tier, next(units))))
      continue
    pair = [n for n in (primary, f"{primary}+padv", "cudnn", "cudnn+padv") if n in s.impls]
    unit = next(units)
    keyed += [((tier, si, i), item(s, n, tier, unit)) for i, n in enumerate(pair)]
    for i, n in enumerate(n for n in s.impls if n not in pair):
      if n in ours:
        tier = 1 if head else 2
        keyed.append(((tier, si, len(pair) + i), item(s, n, tier, next(units))))
      else:   # baselines: implementation-major (the primary's two-launch first)
        pos = BASELINE_ORDER.index(n) if n in BASELINE_ORDER else len(BASELINE_ORDER)
        keyed.append(((3, pos, si), item(s, n, 3, next(units))))
  return [it for _, it in sorted(keyed, key=lambda kv: kv[0])]


def expand_impls(backends: list[str]) -> list[str]:
  known = impls.IMPL_NAMES
  out = []
  for b in backends:
    if b == "two-launch":
      out += [f"{k}-2launch" for k in report.GROUPED if k in backends]
    elif b == "padv":
      out += [f"{k}+padv" for k in report.GROUPED + ("cudnn",) if k in backends]
    elif b in known:
      out.append(b)
    else:
      raise SystemExit(f"--backends: unknown {b!r}; known: {', '.join(known)}, two-launch, "
                       "padv")
  return list(dict.fromkeys(out))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="headline shapes: S8192 GQA, D64, D256 causal and zigzag W=8 S=64K, "
                       "then S8192 MHA (~3 min on an H200)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes (the default without a GPU): a correctness check")
  ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                  help=f"comma list of {', '.join(WORKLOAD_KINDS)} (window: not by default)")
  ap.add_argument("--backends", default=None,
                  help="comma list of implementations: registry entries ("
                       + ", ".join(report.GROUPED) + ", xla), cudnn, jax-pallas-mha, two-launch "
                       "(per-group launches of each kernel backend listed), padv (v zero-padded "
                       "to q/k's head_dim, out sliced, for each kernel backend and cudnn listed; "
                       "run only where --dv gives v its own head_dim), or explicit "
                       "<backend>-2launch, <backend>+padv, cudnn+padv. Default: "
                       + ",".join(DEFAULT_BACKENDS) + " (smoke: " + ",".join(SMOKE_BACKENDS)
                       + ")")
  ap.add_argument("--passes", default="fwd,bwd,fwdbwd", help="comma list of fwd, bwd, fwdbwd")
  ap.add_argument("--shape", action="append", type=parse_shape, metavar="BxSxHqxHkxD",
                  help="your causal shape instead of the standard set (repeatable)")
  ap.add_argument("--zigzag", action="append", type=parse_world, metavar="WxS",
                  help="zigzag world size x total sequence instead of the default set")
  ap.add_argument("--softcap", type=float, default=None, metavar="C",
                  help="also run every causal shape with logits_soft_cap=C (beside the "
                       "uncapped run: the cap's cost)")
  ap.add_argument("--sinks", action="store_true",
                  help="also run every causal shape with sinks=[Hq] (common.sink_logits; "
                       "beside the run without: their cost)")
  ap.add_argument("--dv", type=int, default=None, metavar="DV",
                  help="also run every causal shape as its MLA twin: q, k keep D, v and out "
                       "get head_dim DV (beside the run at D, like --softcap and --sinks; a "
                       "shape with D == DV has none), with the padded-v rows (see --backends)")
  ap.add_argument("--window", type=int, default=None, metavar="W",
                  help=f"--workloads window: left window (local_window_size=(W, 0); default "
                       f"{WINDOW_LEFT}, smoke {WINDOW_SMOKE['left']})")
  ap.add_argument("--window-seqs", type=parse_seqs, default=None, metavar="S1,S2,...",
                  help="--workloads window: sequence lengths (default "
                       + ",".join(map(str, WINDOW_SEQS)) + "; smoke "
                       + ",".join(map(str, WINDOW_SMOKE["seqs"])) + ")")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                  help="dtype of the zigzag/balance/window workloads (causal sets are bfloat16)")
  ap.add_argument("--rounds", type=int, default=None,
                  help="timed rounds of back-to-back calls, one sync each (median reported)")
  ap.add_argument("--calls", type=int, default=None,
                  help="calls per round (default: enough for a ~25 ms round)")
  ap.add_argument("--warmup", type=int, default=None)
  ap.add_argument("--compile-threads", type=int, default=None,
                  help="threads compiling a comparison's runs ahead while earlier runs check "
                       "and time on the GPU (no timing overlaps a compile); 0: compile each "
                       "run when it starts (default: 2 on a GPU, 0 in smoke mode)")
  ap.add_argument("--sets", type=int, default=None, help="input sets rotated while timing")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no comparison (ours + cuDNN on one workload, else one row) "
                       "after this many seconds or that would not fit in what is left")
  ap.add_argument("--nvlink-gbps", type=float, default=450.0,
                  help="assumed NVLink bandwidth per GPU, one direction (GB/s) for the model")
  ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
  ap.add_argument("--verbose", action="store_true",
                  help="print every row as it is measured and where each run's time went")
  args = ap.parse_args(argv)
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for w in args.workloads:
    if w not in WORKLOAD_KINDS:
      ap.error(f"--workloads: unknown {w!r}; use {', '.join(WORKLOAD_KINDS)}")
  if "window" not in args.workloads:
    given = [f for f, v in (("--window", args.window), ("--window-seqs", args.window_seqs))
             if v is not None]
    if given:
      ap.error(f"{' and '.join(given)} need --workloads window")
  if args.window is not None and args.window < 0:
    ap.error(f"--window must be >= 0, got {args.window}")
  args.passes = tuple(p for p in common.PASSES if p in args.passes.split(","))
  if not args.passes:
    ap.error("--passes: give at least one of fwd, bwd, fwdbwd")
  if args.softcap is not None and not args.softcap > 0:
    ap.error(f"--softcap must be > 0, got {args.softcap}")
  if args.dv is not None and not args.dv > 0:
    ap.error(f"--dv must be > 0, got {args.dv}")
  if args.budget_s is not None and args.budget_s <= 0:
    ap.error(f"--budget-s must be positive, got {args.budget_s}")
  for name in ("rounds", "calls"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.compile_threads is not None and args.compile_threads < 0:
    ap.error(f"--compile-threads must be >= 0, got {args.compile_threads}")
  args.backends_given = args.backends is not None
  backends = args.backends.split(",") if args.backends_given else DEFAULT_BACKENDS
  args.impl_names = expand_impls([b.strip() for b in backends if b.strip()])
  if args.shape:
    args.shape = [dataclasses.replace(s, dtype=args.dtype) for s in args.shape]
  return args


def _warn_if_gpu_unused() -> None:
  """A GPU the system has but JAX cannot use turns the run into a CPU smoke run:
  say so once (jax_grouped_attn.platform's check, where this version has it)."""
  warn = getattr(ga_platform, "warn_if_gpu_unused", None)
  if warn is not None:
    warn()


def headlines(plan: list[PlanItem]) -> list[dict]:
  """The headline comparisons of a plan: per tier-0 series our primary kernel and
  its cuDNN row (plain, else padded v)."""
  out = {}
  for it in plan:
    if it.tier != 0:
      continue
    h = out.setdefault(it.series, {"series": it.series, "primary": None, "cudnn": None})
    if it.impl in report.CUDNN_ROWS:
      h["cudnn"] = h["cudnn"] or it.impl
    elif not it.impl.endswith("+padv"):
      h["primary"] = h["primary"] or it.impl
  return list(out.values())


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
  if mode == "smoke" and not args.backends_given:
    args.impl_names = expand_impls(list(SMOKE_BACKENDS))
  pick = lambda given, default: default if given is None else given
  timing = TIMING[mode]
  rounds = pick(args.rounds, timing["rounds"])
  warmup = max(0, pick(args.warmup, timing["warmup"]))
  calls = pick(args.calls, timing["calls"])
  sets = max(1, pick(args.sets, 1 if mode == "smoke" else 2))
  threads = pick(args.compile_threads, 0 if mode == "smoke" else 2)
  st = Settings(args.passes, rounds, warmup, sets, impls.Context(gpu=gpu), calls=calls,
                compile_threads=threads)
  registry_ = impls.all_impls()
  plan = build_plan(args, mode)
  env = common.environment()
  os.makedirs(args.out, exist_ok=True)
  log(report.environment_text(env))
  log(f"mode {mode}: {len({it.series for it in plan})} series, {len(args.impl_names)} "
      f"implementations, passes {', '.join(args.passes)}; {report.timing_text(vars(st))}")
  window = (dict(zip(("window", "window_seqs"), window_params(args, mode)))
            if "window" in args.workloads else {})
  results = {
      "environment": env, "mode": mode, "timings_meaningful": gpu and mode != "smoke",
      "settings": {"passes": list(args.passes), "rounds": rounds, "calls": calls,
                   "warmup": warmup, "sets": sets, "compile_threads": threads,
                   "impls": args.impl_names,
                   "workloads": args.workloads, "budget_s": args.budget_s,
                   "nvlink_gbps": args.nvlink_gbps, **window},
      "configs": report.kernel_configs(plan),
      "plan": [{"series": it.series, "impl": it.impl, "tier": TIERS[it.tier], "unit": it.unit,
                "ranks": len(it.wls)} for it in plan],
      "headlines": headlines(plan),
      "rows": [],
  }
  budget = common.Budget(args.budget_s)
  tty = sys.stderr.isatty()
  bar = (common.progress(total=sum(len(item.wls) for item in plan), desc="bench", unit="run")
         if tty else None)
  runner = Runner(registry_, st, budget, bar=bar, verbose=args.verbose,
                  on_item=lambda: report.write_json(results, args.out))
  estimates = runner.headline_estimates(plan)
  results["headline_estimates_s"] = dict(estimates)
  total = sum(s for _, s in estimates)
  if estimates:
    log(f"headline comparisons first ({len(estimates)}, ~{total:.0f} s estimated"
        + (f" of the {args.budget_s:.0f} s budget" if args.budget_s else "") + "):")
  for what, sec in estimates:
    log(f"  ~{sec:4.0f} s  {what}")
  if args.budget_s is not None and total > args.budget_s:
    log(f"WARNING: the budget ({args.budget_s:.0f} s) cannot hold every headline comparison "
        f"(~{total:.0f} s estimated): the last will be skipped, and nothing runs in their place.")
  results["rows"] = runner.rows
  runner.run(plan)
  if bar is not None:
    bar.close()
  results["elapsed_s"] = budget.elapsed
  report.finish(results, args.out)
  for line in report.console_summary(results):
    log(line)
  log(f"wrote {os.path.join(args.out, 'bench.md')} (tables), bench.json and plots "
      f"({budget.elapsed:.0f} s)")
  if not results["timings_meaningful"]:
    log("No GPU: the timings above mean nothing; the errors do.")
  return results


if __name__ == "__main__":
  res = main()
  bad = [r for r in res["rows"] if r["status"] == "wrong"]
  sys.exit(1 if bad else 0)
