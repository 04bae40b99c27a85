"""Config tuner: sweeps each registry backend's config space per pass.

  python -m benchmarks.tune --quick                # ~4 min on an H100, few candidates
  python -m benchmarks.tune                        # full grid (split it with the flags)
  python -m benchmarks.tune --backends triton --passes backward --head-dims 128 --seqs 32768

For each kernel backend of the registry (its ``tuning_candidates``: for the
Triton-style configs, block_q/block_k/num_warps/num_stages), pass (forward, backward), head_dim
(64/128/256) and key-length bucket it times causal bf16 attention B1 Hq32 Hk8
at the bucket's length, checks every candidate against the exact fp32 oracle,
skips candidates that fail to compile or run, and writes the winners to
``<out>/<gpu slug>.json`` (default: jax_grouped_attn/tuned/, where
``jax_grouped_attn.tuning`` finds it), merged with what that file already has.
The backward is ranked by fwd+bwd time with the forward config held fixed.
Without a GPU, ``--smoke`` (the default there) runs tiny interpreted problems:
a check of the code path, not a tuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import jax_grouped_attn as ga  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402
from jax_grouped_attn import platform, registry, tuning  # noqa: E402
from jax_grouped_attn.config import AttentionConfig  # noqa: E402

PACKAGE_OUT = tuning.PACKAGE_DIR
SMOKE_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tuned")

def as_tuple(cfg) -> tuple:
  """A config as the tuner's candidate tuple: its fields in constructor order."""
  return tuple(dataclasses.astuple(cfg))


def candidates(backend: str, pass_: str, head_dim: int, mode: str, default) -> list:
  """Config instances to time, the default first."""
  pool = registry.get(backend).tuning_candidates(pass_, head_dim, mode)
  return list(dict.fromkeys([default] + list(pool)))


# ------------------------------------------------------------- measuring ---

class Bucket:
  """One (head_dim, seq) problem: inputs, the oracle, and the fixed forward."""

  def __init__(self, wl: common.Workload, sets: int):
    self.wl = wl
    self.inputs = [common.make_inputs(wl, seed) for seed in range(sets)]
    q, k, v, do = self.inputs[0]
    self.want = common.oracle(wl, q, k, v, do)   # whole tensors, on the device


def _fn(wl, backend, cfg):
  groups = wl.groups
  return lambda q, k, v: ga.grouped_attention(q, k, v, groups, causal=True, backend=backend,
                                              config=cfg)


def measure(bucket: Bucket, backend: str, pass_: str, cand, fwd_fixed, rounds: int,
            warmup: int) -> dict:
  """Times one candidate config; {'ms': ...} or {'status': why it was skipped}."""
  wl = bucket.wl
  res = {"config": list(as_tuple(cand))}
  cfg = (AttentionConfig(forward=cand) if pass_ == "forward" else
         AttentionConfig(forward=fwd_fixed, backward=cand))
  fn = _fn(wl, backend, cfg)
  q, k, v, do = bucket.inputs[0]
  try:
    if pass_ == "forward":
      compiled = jax.jit(fn).lower(q, k, v).compile()
      args = [s[:3] for s in bucket.inputs]
    else:
      fb = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
      compiled = fb.lower(q, k, v, do).compile()
      args = bucket.inputs
  except NotImplementedError as e:
    return {**res, "status": f"not implemented: {e}"[:200]}
  except Exception as e:  # noqa: BLE001 -- e.g. shared memory overflow at compile
    return {**res, "status": f"compile failed: {type(e).__name__}: {str(e)[:160]}"}
  try:
    got = compiled(*args[0])
    if pass_ == "forward":
      checks = [common.compare(got, bucket.want, "out")]
    else:
      checks = [common.compare(g, bucket.want, name) for name, g in zip(("dq", "dk", "dv"), got)]
    del got
    if not all(c["ok"] for c in checks):
      errs = [c.get("max_err") for c in checks]
      return {**res, "status": f"wrong result (max errors / scale {errs})"}
    timing = common.time_calls(compiled, args, rounds=rounds, warmup=warmup,
                               calls=1 if rounds == 1 else None)
  except Exception as e:  # noqa: BLE001 -- launch failures at run time
    return {**res, "status": f"run failed: {type(e).__name__}: {str(e)[:160]}"}
  return {**res, "ms": timing["median_ms"]}


def warm_up_gpu(seconds: float = 2.0) -> None:
  """Runs bf16 matmuls for ``seconds`` so the first candidate is timed at the
  clocks the rest are (H200, 2026-12-02: the very first candidate of a cold
  run measured 1.38 ms where the same config runs ~1.1 ms warm)."""
  import jax.numpy as jnp  # noqa: PLC0415
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  step = jax.jit(lambda x: (x @ x) * jnp.bfloat16(1e-4))
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    a = step(a)
    a.block_until_ready()


# ----------------------------------------------------------------- table ---

def _best_any(by_bucket: dict, fields: tuple) -> dict | None:
  """The candidate with the smallest summed log-slowdown over all measured buckets."""
  buckets = {k: v for k, v in by_bucket.items() if k.isdigit() and v.get("candidates")}
  if not buckets:
    return None
  times = {}
  for b, entry in buckets.items():
    best = entry["ms"]
    for c in entry["candidates"]:
      if c.get("ms"):
        times.setdefault(tuple(c["config"]), {})[b] = math.log(c["ms"] / best)
  common_cands = [c for c, t in times.items() if len(t) == len(buckets)]
  if common_cands:
    cand = min(common_cands, key=lambda c: sum(times[c].values()))
    return dict(_entry_fields(fields, cand), buckets=sorted(buckets, key=int))
  near = min(buckets, key=lambda b: abs(math.log2(int(b)) - 13))   # closest to 8192
  return ({f: buckets[near][f] for f in fields if f in buckets[near]}
          | {"buckets": [near]})


def _entry_fields(fields: tuple, values) -> dict:
  """A table entry's config part: the fields that are set (None: the default)."""
  return {f: v for f, v in zip(fields, values) if v is not None}


def sweep(bucket: Bucket, backend: str, pass_: str, cands: list, fwd_fixed, rounds: int,
          warmup: int, budget, bar) -> list[dict]:
  """Measures ``cands`` in order (until the budget is spent); their results."""
  wl, results = bucket.wl, []
  for cand in cands:
    if budget.exhausted:
      break
    bar.set_postfix_str(f"{backend} {pass_} D{wl.d} S{wl.tk} {cand}")
    r = measure(bucket, backend, pass_, cand, fwd_fixed, rounds, warmup)
    bar.update(1)
    results.append(r)
    log(f"{backend:7} {pass_:8} D{wl.d:<4} S{wl.tk:<6} {str(as_tuple(cand)):34} "
        + (f"{r['ms']:9.3f} ms" if "ms" in r else f"skipped: {r['status']}"))
    if str(r.get("status", "")).startswith("not implemented"):
      break
  return results


def table_entry(wl, pass_: str, fields: tuple, results: list, default, fwd_fixed) -> dict | None:
  """The table entry of one (backend, pass, head_dim, bucket): the fastest timed
  candidate's fields, its time, and every candidate's result; None if none ran."""
  timed = [r for r in results if "ms" in r]
  if not timed:
    return None
  best = min(timed, key=lambda r: r["ms"])
  default_ms = next((r["ms"] for r in timed if tuple(r["config"]) == as_tuple(default)), None)
  flops = wl.flops("fwd" if pass_ == "forward" else "fwdbwd")
  return dict(_entry_fields(fields, best["config"]), ms=best["ms"],
              tflops=flops / (best["ms"] * 1e-3) / 1e12,
              timed_as="fwd" if pass_ == "forward" else "fwd+bwd, forward fixed at "
              + str(as_tuple(fwd_fixed)),
              default=list(as_tuple(default)), default_ms=default_ms,
              speedup_vs_default=default_ms / best["ms"] if default_ms else None,
              candidates=results, workload=wl.name)


def load_existing(path: str, gpu: str) -> dict:
  if os.path.isfile(path):
    try:
      with open(path) as f:
        table = json.load(f)
      if table.get("gpu") == gpu and table.get("format") == tuning.FORMAT:
        return table
      log(f"(not merging {path}: other GPU or format)")
    except (OSError, ValueError) as e:
      log(f"(not merging {path}: {e})")
  return {"format": tuning.FORMAT, "gpu": gpu, "entries": {}}


def write_table(table: dict, path: str) -> None:
  for backend, by_pass in table["entries"].items():
    if backend not in registry.names():
      continue
    for pass_, by_dtype in by_pass.items():
      cls = registry.get(backend).config_class(pass_)
      if cls is None:
        continue
      for by_dim in by_dtype.values():
        for by_bucket in by_dim.values():
          best = _best_any(by_bucket, tuning.fields(cls))
          if best:
            by_bucket["any"] = best
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


# ------------------------------------------------------------------ main ---

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="few candidates, one bucket (S=8192)")
  ap.add_argument("--smoke", action="store_true", help="tiny interpreted problems (CPU default)")
  ap.add_argument("--backends", default=",".join(b.name for b in registry.kernel_entries()),
                  help="registry entries to tune")
  ap.add_argument("--passes", default="forward,backward")
  ap.add_argument("--head-dims", default="128,64,256")
  ap.add_argument("--seqs", default=None,
                  help=f"key lengths (bucket edges); default quick 8192, full "
                       f"{','.join(map(str, tuning.SEQ_BUCKETS[:3]))}")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  ap.add_argument("--rounds", type=int, default=None,
                  help="timed rounds of back-to-back calls (median reported)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="stop starting new candidates after this many seconds")
  ap.add_argument("--out", default=None, help=f"table folder (default {PACKAGE_OUT})")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  platform.warn_if_gpu_unused()
  gpu = common.on_gpu()
  mode = "smoke" if (args.smoke or not gpu) else ("quick" if args.quick else "full")
  if not gpu:
    log("No GPU here: tuner SMOKE mode (tiny interpreted problems). Timings mean nothing; "
        "the table written is only a check of the code path.")
  out_dir = args.out or (SMOKE_OUT if mode == "smoke" else PACKAGE_OUT)
  if mode == "smoke" and os.path.abspath(out_dir) == os.path.abspath(PACKAGE_OUT):
    raise SystemExit("refusing to write a smoke-mode table into the package's tuned/ folder")
  os.makedirs(out_dir, exist_ok=True)
  gpu_name = common.device_name()
  path = os.path.join(out_dir, tuning.slug(gpu_name) + ".json")
  table = load_existing(path, gpu_name)
  env = common.environment()
  table.update(versions={k: env[k] for k in ("jax", "jaxlib", "triton", "jax_triton", "cudnn")},
               updated=env["time"])
  this = tuning.this_gpu()
  if this is not None and mode != "smoke":
    # What the family fallback matches other GPUs on (jax_grouped_attn.tuning.find_table).
    table.update(compute_capability=this.compute_capability, sm_count=this.sm_count)
  backends = [b for b in args.backends.split(",") if b]
  passes = [p for p in args.passes.split(",") if p]
  head_dims = [int(h) for h in args.head_dims.split(",") if h]
  if mode == "smoke":
    head_dims, seqs = [32], [64]
  elif args.seqs:
    seqs = [int(s) for s in args.seqs.split(",")]
  else:
    seqs = [8192] if mode == "quick" else list(tuning.SEQ_BUCKETS[:3])
  rounds = max(1, args.rounds if args.rounds is not None else
             {"smoke": 1, "quick": 5, "full": 9}[mode])
  warmup = 0 if mode == "smoke" else 2
  budget = common.Budget(args.budget_s)
  heads = dict(hq=4, hk=2) if mode == "smoke" else dict(hq=32, hk=8)
  log(f"tuner {mode}: {gpu_name}; backends {backends}, passes {passes}, head_dims {head_dims}, "
      f"seqs {seqs}, {rounds} rounds of back-to-back calls -> {path}")

  jobs = [(b, h, s) for b in backends for h in head_dims for s in seqs]
  if mode != "smoke":
    warm_up_gpu()
  for b in backends:
    registry.get(b)   # unknown names fail here, with the list of entries
  n_total = sum(len(registry.get(b).tuning_candidates(p, h, mode)) + 1
                for b, h, _ in jobs for p in passes)
  bar = common.progress(total=n_total, desc="tune", unit="cfg")
  summary = []
  for backend, hd, seq in jobs:
    if budget.exhausted:
      break
    why = registry.get(backend).unavailable(jax.default_backend())
    if why is not None:
      log(f"{backend}: skipped ({why})")
      continue
    wl = common.causal_workload(1, seq, heads["hq"], heads["hk"], hd, dtype=args.dtype)
    try:
      bucket = Bucket(wl, sets=1 if mode == "smoke" else 2)
    except Exception as e:  # noqa: BLE001
      log(f"{wl.name}: could not build inputs/oracle: {e}")
      continue
    fwd_fixed = registry.default_config(backend, "forward", hd, seq_len=seq, dtype=args.dtype)
    for pass_ in passes:
      default = (fwd_fixed if pass_ == "forward" else
                 registry.default_config(backend, "backward", hd, seq_len=seq, dtype=args.dtype))
      fields = tuning.fields(type(default))
      results = sweep(bucket, backend, pass_, candidates(backend, pass_, hd, mode, default),
                      fwd_fixed, rounds, warmup, budget, bar)
      entry = table_entry(wl, pass_, fields, results, default, fwd_fixed)
      if entry is None:
        continue
      (table["entries"].setdefault(backend, {}).setdefault(pass_, {})
       .setdefault(args.dtype, {}).setdefault(str(hd), {}))[str(tuning.seq_bucket(seq))] = entry
      summary.append((backend, pass_, hd, seq, tuple(entry.get(f) for f in fields),
                      entry["ms"], entry["default_ms"]))
      write_table(table, path)
  bar.close()
  if summary:
    log("\nbest configs (each backend's config fields in constructor order):")
    for backend, pass_, hd, seq, cfg, ms, dms in summary:
      gain = f" ({dms / ms:.2f}x vs default {dms:.3f} ms)" if dms else ""
      log(f"  {backend:7} {pass_:8} D{hd:<4} S{seq:<6} {tuple(cfg)}  {ms:.3f} ms{gain}")
  else:
    log("no candidate was timed: table unchanged")
  if budget.exhausted:
    log(f"time budget ({args.budget_s:.0f} s) spent: the rest was not measured")
  log(f"table: {path}" + (" (smoke: meaningless timings)" if mode == "smoke" else ""))
  return table


if __name__ == "__main__":
  main()
