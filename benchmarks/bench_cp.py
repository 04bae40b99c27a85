"""How does context parallelism scale on the GPUs here? Every strategy x backend vs one GPU.

  python -m benchmarks.bench_cp --out DIR            # every visible GPU, S 32K/64K/128K
  python -m benchmarks.bench_cp --seqs 65536 --strategies ring \\
      --xla-variants default,lhs,lhs+dbuf --dump-hlo --out DIR   # ring overlap: XLA flags
  python -m benchmarks.bench_cp --smoke --out DIR    # CPU host devices, tiny shapes (CI)
  python -m benchmarks.bench_cp --window 4096 --out DIR   # causal sliding window, every row

Rows, all on the same inputs (causal, B x S x Hq x Hk x D, bf16; with
``--window N`` every row takes ``local_window_size=(N, 0)``):
  single      one GPU on the whole sequence, per kernel backend, and cuDNN
              (jax.nn.dot_product_attention)
  cp          ContextParallel strategy x backend inside jax.shard_map on the
              zigzag-ordered sequence sharded over all W devices: "allgather",
              "ring", "ulysses", and 2-D "ring+ulysses" / "allgather+ulysses"
              (Ulysses over --inner devices, the strategy over W / inner)
  heads-cudnn the sequence-sharded input moved to head sharding by all-to-all,
              cuDNN on the whole sequence for Hq/W heads, all-to-all back
Every row is checked before it is timed, as in ``bench``: out, dq, dk, dv (the
cp rows' gathered onto the oracle's device and put back in sequence order),
whole tensors, against the exact fp32 oracle with the calibrated rule. Timed
as ``bench`` times (common.time_calls): rounds of back-to-back calls, one sync
per round. Efficiency = single time of the same backend / (W x time).
``--xla-variants`` compiles the rows of ``--variant-strategies`` once per set
of XLA options (per executable, via ``Lowered.compile(compiler_options)``), so
one run compares scheduler flags; every cp fwd+bwd row records which
collectives overlap a kernel in the scheduled HLO (benchmarks.hlo_overlap);
``--dump-hlo`` also writes those modules. Writes bench_cp.json, bench_cp.md
and bench_cp.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_grouped_attn as ga  # noqa: E402
from benchmarks import common, harness, hlo_overlap, report  # noqa: E402
from benchmarks.common import log  # noqa: E402
from jax_grouped_attn import registry  # noqa: E402
from jax_grouped_attn.cp import (  # noqa: E402
  ContextParallel,
  kv_head_repeats,
  shard_map,
  ulysses_to_heads,
  ulysses_to_sequence,
)

STRATEGIES = ("allgather", "ring", "ulysses", "ring+ulysses", "allgather+ulysses")
# Named sets of XLA options for --xla-variants (GPU flags; see the README).
XLA_VARIANTS = {
    "default": {},
    "lhs": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "lhs+dbuf": {"xla_gpu_enable_latency_hiding_scheduler": True,
                 "xla_gpu_enable_while_loop_double_buffering": True},
    "lhs+p2p": {"xla_gpu_enable_latency_hiding_scheduler": True,
                "xla_gpu_enable_pipelined_p2p": True,
                "xla_gpu_collective_permute_decomposer_threshold": 0},
}


# ---------------------------------------------------------------- helpers ---

@dataclasses.dataclass(frozen=True)
class Setup:
  batch: int
  hq: int
  hk: int
  d: int
  dtype: str
  world: int
  inner: int          # Ulysses axis size of the 2-D rows (1: none)
  passes: tuple
  rounds: int         # timed rounds of back-to-back calls (common.time_calls)
  calls: int | None   # calls per round; None: enough for a ~25 ms round
  warmup: int
  sets: int
  gpu: bool
  window: int | None = None   # causal sliding window: keys [p - window, p]


def window_kw(setup: Setup) -> dict:
  """The local_window_size keyword of every row (jax.nn and this package alike)."""
  return {} if setup.window is None else {"local_window_size": (setup.window, 0)}


def make_mesh(devices, inner: int) -> Mesh:
  """("node", "gpu") = (W / inner, inner); 1-D rows use both axes flattened,
  which is the same device order."""
  return Mesh(np.array(devices).reshape(len(devices) // inner, inner), ("node", "gpu"))


def context_parallel(strategy: str) -> ContextParallel:
  if "+" in strategy:   # 2-D: strategy over "node", Ulysses over "gpu"
    outer, _ = strategy.split("+")
    return ContextParallel("node", outer, ulysses_axis_name="gpu")
  return ContextParallel(("node", "gpu"), strategy)


def cp_fn(mesh, strategy, backend, causal=True, window=None):
  """(q, k, v) zigzag-sharded -> out, through attention(context_parallel=...)."""
  cp = context_parallel(strategy)
  spec = P(None, cp.sequence_axes)
  kw = {} if window is None else {"local_window_size": (window, 0)}
  body = lambda q, k, v: ga.attention(q, k, v, causal=causal, backend=backend,
                                      context_parallel=cp, **kw)
  return shard_map(body, mesh, (spec,) * 3, spec, check_vma=False)


def heads_fn(mesh, setup: Setup, implementation):
  """Sequence-sharded input -> head sharding (all-to-all), jax.nn attention on
  the whole sequence, back: the heads-sharded cuDNN baseline."""
  axes, w = ("node", "gpu"), setup.world
  reps = kv_head_repeats(setup.hk, w)
  spec = P(None, axes)

  def body(q, k, v):
    if reps > 1:
      k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
    q, k, v = (ulysses_to_heads(x, axes, w, True) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                       **window_kw(setup))
    return ulysses_to_sequence(out, axes, w, True)

  return shard_map(body, mesh, (spec,) * 3, spec, check_vma=False)


def single_fn(backend, setup: Setup):
  if backend == "cudnn":
    return None
  return lambda q, k, v: ga.attention(q, k, v, causal=True, backend=backend, **window_kw(setup))


GRAD_NAMES = ("out", "dq", "dk", "dv")


def oracle_device(want: dict):
  """The device an :func:`common.oracle` result lives on (host arrays: the default one)."""
  out = want["out"]
  return next(iter(out.devices())) if isinstance(out, jax.Array) else jax.devices()[0]


def oracle_checks(got, want, world: int = 0) -> dict:
  """``got`` = (out,) or (out, dq, dk, dv), whole tensors, against the fp32
  oracle with the calibrated rule (common.compare), each first gathered onto
  the oracle's device (cp rows are sharded over the mesh); ``world`` > 0:
  zigzag-ordered results, put back in sequence order."""
  dev = oracle_device(want)
  unperm = (lambda x: ga.zigzag_unpermute(x, world, axis=1)) if world else (lambda x: x)
  return {name: common.compare(unperm(jax.device_put(x, dev)), want, name)
          for name, x in zip(GRAD_NAMES, got)}


def _error(e) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ------------------------------------------------------------------ a row ---

def measure(row, fn, arg_sets, setup: Setup, check_of, options=None, hlo_path=None):
  """Compiles, checks (``check_of(results) -> {name: check}``, results = (out,)
  or (out, dq, dk, dv)) and times fn's passes; fills ``row``."""
  q, k, v, do = arg_sets[0]
  row["passes"] = {}
  if "fwd" in setup.passes:
    compiled = jax.jit(fn).lower(q, k, v).compile(options or None)
    res = {"memory": common.memory_stats(compiled)}
    res["check"] = check_of((compiled(q, k, v),))
    res.update(common.time_calls(compiled, [s[:3] for s in arg_sets], rounds=setup.rounds,
                                 warmup=setup.warmup, calls=setup.calls))
    row["passes"]["fwd"] = res
    del compiled
  if "fwdbwd" in setup.passes:
    def fb(q, k, v, do):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out,) + vjp(do)
    compiled = jax.jit(fb).lower(q, k, v, do).compile(options or None)
    res = {"memory": common.memory_stats(compiled)}
    text = compiled.as_text() if row["kind"] != "single" else None
    if text:
      res["overlap"] = hlo_overlap.summarize(hlo_overlap.analyze(text))
      if hlo_path:
        with open(hlo_path, "w") as f:   # kernel payloads in backend_config cut short
          f.write("\n".join(x if len(x) <= 2000 else x[:2000] + " ...(cut)"
                            for x in text.splitlines()))
        res["hlo_file"] = os.path.basename(hlo_path)
    res["check"] = check_of(compiled(q, k, v, do))
    res.update(common.time_calls(compiled, arg_sets, rounds=setup.rounds, warmup=setup.warmup,
                                 calls=setup.calls))
    row["passes"]["fwdbwd"] = res
    del compiled
  p = row["passes"]
  if "fwd" in p and "fwdbwd" in p:
    p["bwd"] = {"median_ms": p["fwdbwd"]["median_ms"] - p["fwd"]["median_ms"],
                "derived": "fwdbwd - fwd"}
  checks = [c for r in p.values() for c in (r.get("check") or {}).values()]
  row["status"] = "ok" if all(c["ok"] for c in checks) else "wrong"


# ------------------------------------------------------------------- main ---

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes on CPU host devices (the default without a GPU)")
  ap.add_argument("--seqs", default=None, help="comma list of total sequence lengths "
                  "(GPU default 32768,65536,131072; smoke 64)")
  ap.add_argument("--heads", default=None, metavar="HqxHkxD",
                  help="GPU default 32x8x128; smoke 4x2x32")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  ap.add_argument("--devices", type=int, default=None,
                  help="world size W (default: every visible device; smoke: 4)")
  ap.add_argument("--backends", default=None,
                  help="comma list of kernel backends (GPU default: every registry kernel "
                  "entry available; smoke: xla)")
  ap.add_argument("--strategies", default="allgather,ring,ulysses,ring+ulysses",
                  help=f"comma list of {', '.join(STRATEGIES)}")
  ap.add_argument("--inner", type=int, default=2,
                  help="Ulysses axis size of the 2-D rows (W / inner >= 2, else skipped)")
  ap.add_argument("--no-baselines", action="store_true",
                  help="skip cuDNN single-GPU and heads-sharded cuDNN rows")
  ap.add_argument("--passes", default="fwd,fwdbwd", help="fwd and/or fwdbwd (bwd = difference)")
  ap.add_argument("--xla-variants", default="default",
                  help=f"comma list of {', '.join(XLA_VARIANTS)} or NAME=flag:value+flag:value; "
                  "variants other than 'default' run for --variant-strategies on the first backend")
  ap.add_argument("--variant-strategies", default="ring,allgather")
  ap.add_argument("--dump-hlo", action="store_true",
                  help="write the scheduled HLO of the ring fwd+bwd rows (first sequence "
                  "length, each variant) as hlo_<row>.txt")
  ap.add_argument("--rounds", type=int, default=None,
                  help="timed rounds of back-to-back calls, one sync each (median reported; "
                  "GPU default 5, smoke 2)")
  ap.add_argument("--calls", type=int, default=None,
                  help="calls per round (default: enough for a ~25 ms round; smoke 1)")
  ap.add_argument("--warmup", type=int, default=None)
  ap.add_argument("--sets", type=int, default=None, help="input sets rotated while timing")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no new row after this many seconds (GPU default 420)")
  ap.add_argument("--window", type=int, default=None, metavar="N",
                  help="causal sliding window: each token sees the N before it and itself")
  ap.add_argument("--out", default="bench_cp_out")
  args = ap.parse_args(argv)
  if args.window is not None and args.window < 0:
    ap.error(f"--window must be >= 0, got {args.window}.")
  for name in ("rounds", "calls"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      ap.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
  return args


def _value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  try:
    return int(text)
  except ValueError:
    return text


def parse_variants(text: str) -> dict:
  out = {}
  for item in [x.strip() for x in text.split(",") if x.strip()]:
    if "=" in item:
      name, flags = item.split("=", 1)
      out[name] = {f.split(":")[0]: _value(f.split(":", 1)[1]) for f in flags.split("+")}
    elif item in XLA_VARIANTS:
      out[item] = XLA_VARIANTS[item]
    else:
      raise SystemExit(f"--xla-variants: unknown {item!r}; known: {', '.join(XLA_VARIANTS)} "
                       "or NAME=flag:value+flag:value")
  out.setdefault("default", {})
  return dict(sorted(out.items(), key=lambda kv: kv[0] != "default"))


def plan_rows(args, setup: Setup, seqs, backends, strategies, variants):
  """Row specs in run order (a time budget cuts the tail): per sequence length,
  per backend: the single-device row and the
  strategies; after the first backend, the cuDNN baselines and the XLA flag
  variants."""
  rows = []
  for s in seqs:
    for bi, backend in enumerate(backends):
      rows.append(dict(kind="single", backend=backend, seq=s, strategy="-", variant="default"))
      for st in strategies:
        rows.append(dict(kind="cp", backend=backend, seq=s, strategy=st, variant="default"))
      if bi == 0 and not args.no_baselines:
        rows.append(dict(kind="single", backend="cudnn", seq=s, strategy="-", variant="default"))
        rows.append(dict(kind="heads", backend="cudnn", seq=s, strategy="heads-sharded",
                         variant="default"))
      if bi == 0:
        for name in list(variants)[1:]:
          for st in args.variant_strategies.split(","):
            if st in strategies:
              rows.append(dict(kind="cp", backend=backend, seq=s, strategy=st, variant=name))
  return rows


def label(row) -> str:
  if row["kind"] == "single":
    return f"1 GPU {row['backend']}"
  if row["kind"] == "heads":
    return "heads-sharded cudnn"
  v = "" if row["variant"] == "default" else f" [{row['variant']}]"
  return f"{row['strategy']} {row['backend']}{v}"


def main(argv=None) -> dict:
  args = parse_args(argv)
  gpu = common.on_gpu()
  smoke = args.smoke or not gpu
  if not gpu:
    log("No GPU: SMOKE mode on CPU host devices -- correctness of every path; "
        "timings mean nothing.")
  devices = jax.devices()
  world = args.devices or (min(4, len(devices)) if smoke else len(devices))
  devices = devices[:world]
  hq, hk, d = (int(x) for x in (args.heads or ("4x2x32" if smoke else "32x8x128")).split("x"))
  seqs = [int(s) for s in (args.seqs or ("64" if smoke else "32768,65536,131072")).split(",")]
  kernel_names = [b.name for b in registry.kernel_entries()
                  if b.unavailable(jax.default_backend()) is None]
  backends = (args.backends.split(",") if args.backends else
              (["xla"] if smoke else kernel_names))
  strategies = [s for s in args.strategies.split(",") if s]
  for s in strategies:
    if s not in STRATEGIES:
      raise SystemExit(f"--strategies: unknown {s!r}; use {', '.join(STRATEGIES)}")
  inner = args.inner if world % args.inner == 0 and world // args.inner >= 2 else 1
  if inner == 1:
    strategies = [s for s in strategies if "+" not in s]
  variants = parse_variants(args.xla_variants)
  passes = tuple(p for p in ("fwd", "fwdbwd") if p in args.passes.split(","))
  pick = lambda given, default: default if given is None else given
  setup = Setup(args.batch, hq, hk, d, args.dtype, world, inner, passes,
                pick(args.rounds, 2 if smoke else 5), pick(args.calls, 1 if smoke else None),
                max(0, pick(args.warmup, 1 if smoke else 2)),
                max(1, pick(args.sets, 1 if smoke else 2)), gpu, args.window)
  budget = common.Budget(pick(args.budget_s, None if smoke else 420.0))
  mesh = make_mesh(devices, inner)
  spec = NamedSharding(mesh, P(None, ("node", "gpu")))
  os.makedirs(args.out, exist_ok=True)
  env = common.environment(devices)
  results = {"environment": env, "mode": "smoke" if smoke else "gpu",
             "timings_meaningful": not smoke,
             "settings": dict(dataclasses.asdict(setup), seqs=seqs, backends=backends,
                              strategies=strategies, variants=variants,
                              budget_s=budget.seconds),
             "rows": []}
  log(f"{report.environment_text(env)}; world {world}")
  log(f"mesh {dict(mesh.shape)}; Hq{hq} Hk{hk} D{d} B{args.batch} {args.dtype}; seqs {seqs}; "
      f"window {args.window}; backends {backends}; strategies {strategies}; "
      f"variants {list(variants)}; {report.timing_text(results['settings'])}")
  state = {}   # the current sequence: inputs (natural and zigzag-sharded), oracle
  dumped = set()
  for spec_row in plan_rows(args, setup, seqs, backends, strategies, variants):
    row = dict(spec_row, world=world, label=label(spec_row), hq=hq, hk=hk, d=d,
               batch=args.batch, dtype=args.dtype, status="skipped")
    results["rows"].append(row)
    if budget.exhausted:
      row["reason"] = f"time budget ({budget.seconds:.0f} s) spent"
      continue
    s = row["seq"]
    if s not in state:
      state.clear()   # one sequence length's inputs at a time
      wl = common.causal_workload(args.batch, s, hq, hk, d, args.dtype,
                                  window=None if args.window is None else (args.window, 0))
      sets = [common.make_inputs(wl, seed) for seed in range(setup.sets)]
      zz = [tuple(jax.device_put(ga.zigzag_permute(x, world), spec) for x in st) for st in sets]
      q, k, v, do = sets[0]
      want = common.oracle(wl, q, k, v, do)   # whole tensors, shared by every row
      if sum(x.nbytes for x in jax.tree_util.tree_leaves(want)) > harness.Inputs.DEVICE_BYTES:
        want = jax.device_get(want)   # too big to keep beside the rows: wait on the host
      state[s] = dict(sets=sets, zz=zz, want=want)
    st = state[s]
    try:
      if row["kind"] == "single":
        impl = "cudnn" if gpu else None
        fn = (single_fn(row["backend"], setup) or (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl, **window_kw(setup))))
        if row["backend"] == "cudnn" and not gpu:
          row["note"] = "no cuDNN here: jax.nn.dot_product_attention(implementation=None)"
        measure(row, fn, st["sets"], setup, lambda got: oracle_checks(got, st["want"]))
      else:
        if row["kind"] == "heads":
          fn = heads_fn(mesh, setup, "cudnn" if gpu else None)
        else:
          fn = cp_fn(mesh, row["strategy"], row["backend"], window=args.window)
        hlo_path = None
        key = (row["strategy"], row["variant"])
        if args.dump_hlo and row["strategy"] == "ring" and key not in dumped:
          dumped.add(key)
          hlo_path = os.path.join(args.out, f"hlo_ring_{row['backend']}_{row['variant']}_"
                                  f"S{s}.txt")
        measure(row, fn, st["zz"], setup,
                lambda got: oracle_checks(got, st["want"], world),
                options=variants[row["variant"]], hlo_path=hlo_path)
    except Exception as e:  # noqa: BLE001 -- one row's failure must not end the run
      row.update(status="error", reason=_error(e), traceback=traceback.format_exc()[-2000:])
    log(status_line(row))
    with open(os.path.join(args.out, "bench_cp.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)
  add_efficiency(results)
  results["elapsed_s"] = budget.elapsed
  with open(os.path.join(args.out, "bench_cp.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(args.out, "bench_cp.md"), "w") as f:
    f.write(markdown(results))
  results["plots"] = plot(results, args.out)
  log(f"wrote {args.out}/bench_cp.json, bench_cp.md {results['plots']} "
      f"({budget.elapsed:.0f} s)")
  return results


# ---------------------------------------------------------------- reports ---

def _ms(row, p):
  return ((row.get("passes") or {}).get(p) or {}).get("median_ms")


def add_efficiency(results) -> None:
  """eff = single time of the same backend / (W x time), per pass."""
  single = {(r["backend"], r["seq"]): r for r in results["rows"]
            if r["kind"] == "single" and r["status"] == "ok"}
  for r in results["rows"]:
    base = single.get((r["backend"], r["seq"]))
    if r["kind"] == "single" or base is None:
      continue
    for p, res in (r.get("passes") or {}).items():
      t, t1 = res.get("median_ms"), _ms(base, p)
      if t and t1:
        res["efficiency"] = t1 / (r["world"] * t)


def status_line(row) -> str:
  head = f"S{row['seq']:<7} {row['label']:<34}"
  if row["status"] in ("skipped", "error"):
    return f"{head} {row['status'].upper()}: {row.get('reason', '')}"
  parts = []
  for p in ("fwd", "bwd", "fwdbwd"):
    res = (row.get("passes") or {}).get(p)
    if res and res.get("median_ms") is not None:
      eff = res.get("efficiency")
      parts.append(f"{p} {res['median_ms']:.3f} ms" + (f" (eff {eff:.2f})" if eff else ""))
  return f"{head} {'; '.join(parts)}  {row['status'].upper()}"


def _f(x, fmt="{:.3f}"):
  return "–" if x is None else fmt.format(x)


def markdown(results) -> str:
  env, rows = results["environment"], results["rows"]
  world = env["world"]
  lines = [f"# Context parallelism: {env['device']} x{world}", "",
           f"jax {env['jax']}, jaxlib {env['jaxlib']}, triton {env['triton']}, "
           f"jax-triton {env['jax_triton']}, cuDNN {env['cudnn']}; {env['time']}; "
           f"XLA_FLAGS={env['xla_flags']!r}", ""]
  st = results["settings"]
  win = st.get("window")
  lines += [f"Causal{'' if win is None else f' (sliding window {win})'} "
            f"B{st['batch']} Hq{st['hq']} Hk{st['hk']} D{st['d']} {st['dtype']}; "
            f"{report.timing_text(st)} (+{st['warmup']} warmup), {st['sets']} input sets; "
            f"efficiency = 1-GPU time of the same backend / ({world} x time); "
            "bwd = fwdbwd - fwd. Every row is checked against the exact fp32 oracle "
            "(out, dq, dk, dv, whole tensors; calibrated tolerances) before it is timed.", ""]
  if not results["timings_meaningful"]:
    lines += ["**Smoke run (CPU host devices): timings here mean nothing; the checks do.**", ""]
  lines += ["| S | row | fwd ms | bwd ms | fwd+bwd ms | eff fwd | eff fwd+bwd | "
            "peak MiB/dev (fwd+bwd) | check |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r["seq"]):
    p = r.get("passes") or {}
    fb = p.get("fwdbwd") or {}
    mem = (fb.get("memory") or {}).get("peak_memory_bytes")
    status = r["status"] if r["status"] != "skipped" else f"skipped: {r.get('reason', '')}"
    if r["status"] == "error":
      status = f"error: {r.get('reason', '')}"
    lines.append(
        f"| {r['seq']} | {r['label']} | {_f(_ms(r, 'fwd'))} | {_f(_ms(r, 'bwd'))} | "
        f"{_f(_ms(r, 'fwdbwd'))} | {_f((p.get('fwd') or {}).get('efficiency'), '{:.2f}')} | "
        f"{_f(fb.get('efficiency'), '{:.2f}')} | "
        f"{_f(None if mem is None else mem / 2**20, '{:.0f}')} | {status} |")
  lines += ["", "## Collectives vs kernels in the scheduled fwd+bwd HLO", "",
            "Per collective kind: total / async (start-done pair) / overlapped (a kernel "
            "scheduled between start and done) / could overlap (a kernel it neither feeds "
            "nor needs) / waits on a kernel. See benchmarks/hlo_overlap.py.", "",
            "| S | row | collective | total | async | overlapped | could overlap | waits |",
            "|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r["seq"]):
    ov = ((r.get("passes") or {}).get("fwdbwd") or {}).get("overlap") or {}
    for kind, c in ov.items():
      lines.append(f"| {r['seq']} | {r['label']} | {kind} | {c['total']} | {c['is_async']} | "
                   f"{c['overlapped']} | {c['could_overlap']} | {c['waits_on_heavy']} |")
  lines += ["", "## Environment", "", "```", env.get("nvidia_smi_gpus") or "(no nvidia-smi)",
            env.get("nvidia_smi_topo") or "", "```", ""]
  return "\n".join(lines)


def plot(results, out_dir) -> list[str]:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return []
  series = {}
  for r in results["rows"]:
    if r["status"] != "ok":
      continue
    res = (r.get("passes") or {}).get("fwdbwd") or (r.get("passes") or {}).get("fwd")
    if res and res.get("median_ms") is not None:
      series.setdefault(r["label"], []).append((r["seq"], res["median_ms"], res.get("efficiency")))
  if not series:
    return []
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
  for name, pts in sorted(series.items()):
    pts.sort()
    x = [p[0] for p in pts]
    ax1.plot(x, [p[1] for p in pts], marker="o", label=name)
    eff = [(p[0], p[2]) for p in pts if p[2] is not None]
    if eff:
      ax2.plot([e[0] for e in eff], [e[1] for e in eff], marker="o", label=name)
  env = results["environment"]
  for ax, title in ((ax1, "fwd+bwd time (ms)"), (ax2, "efficiency vs 1 GPU, same backend")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_title(f"{title}: {env['device']} x{env['world']}")
    ax.grid(alpha=0.3)
  ax1.set_yscale("log")
  ax2.axhline(1.0, color="gray", lw=0.8)
  if ax2.get_legend_handles_labels()[0]:   # no cp row timed: no efficiency curve
    ax2.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, "bench_cp.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [os.path.basename(path)]


if __name__ == "__main__":
  res = main()
  sys.exit(1 if any(r["status"] in ("wrong", "error") for r in res["rows"]) else 0)
