"""Is sliding-window attention linear in S? Time vs sequence length at a fixed window.

  python -m benchmarks.bench_window --out DIR                 # GPU: S 8K..64K, window 1024
  python -m benchmarks.bench_window --window 4096 --seqs 8192,32768 --out DIR
  python -m benchmarks.bench_window --smoke --out DIR         # CPU, tiny shapes (CI)

A front end over the harness (benchmarks/harness.py). Workloads per S:
B1 x S x Hq x Hk x D causal with ``local_window_size=(window, 0)``, and the
same call without the window (quadratic, for contrast). Rows per S:
  <backend>         jax_grouped_attn with the window, per kernel backend
  <backend> full    the first backend without the window
  cudnn             jax.nn.dot_product_attention(implementation="cudnn") with the
                    same window (GPU only)
Every row is checked before it is timed, as in ``bench``: out, dq, dk and dv on
every query row of the first and last kv head against the exact fp32 oracle
(calibrated tolerances, jax_grouped_attn/testing.py). The JSON is rewritten
after every row, so a run cut short keeps what it measured. Linearity: ms per
1K tokens at each S, and the least-squares fit time = a + b * S with its R^2,
per row. Writes bench_window.json, bench_window.md and bench_window.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, harness, impls  # noqa: E402
from jax_grouped_attn import registry  # noqa: E402

PASSES = ("fwd", "bwd", "fwdbwd")


def label(row: dict) -> str:
  """A row's curve: the implementation, "full" when the workload has no window."""
  return row["impl"] if row.get("window") else f"{row['impl']} full"


def plan(args, gpu: bool) -> list[tuple[common.Workload, str]]:
  """(workload, implementation) pairs in run order: per S the windowed rows,
  then the unwindowed contrast of the first backend."""
  hq, hk, d = args.heads
  backends = args.backends or [b for b in ("pallas_mosaic", "triton")
                               if registry.get(b).unavailable(jax.default_backend()) is None]
  names = list(backends) + (["cudnn"] if gpu and not args.no_cudnn else [])
  items = []
  for s in args.seqs:
    wl = common.causal_workload(1, s, hq, hk, d, args.dtype, window=(args.window, 0))
    items += [(wl, n) for n in names]
    if not args.no_full and backends:
      items.append((common.causal_workload(1, s, hq, hk, d, args.dtype), backends[0]))
  return items


def _fit(seqs, times):
  """Least squares time = a + b * S; returns (a, b, R^2)."""
  s, t = np.asarray(seqs, float), np.asarray(times, float)
  if len(s) < 2:
    return None
  b, a = np.polyfit(s, t, 1)
  resid = t - (a + b * s)
  ss = float(((t - t.mean()) ** 2).sum())
  r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
  return float(a), float(b), r2


def run(args, on_row=lambda res: None) -> dict:
  gpu = common.on_gpu()
  st = harness.Settings(tuple(args.passes), args.reps, args.warmup, args.sets,
                        impls.Context(gpu=gpu))
  res = {"environment": common.environment(), "timings_meaningful": gpu and not args.smoke,
         "settings": {"window": args.window, "heads": args.heads, "dtype": args.dtype,
                      "seqs": args.seqs, "passes": args.passes, "reps": args.reps},
         "rows": [], "fits": {}}
  rows = harness.measure(plan(args, gpu), st, rows=res["rows"], on_item=lambda: on_row(res))
  for r in rows:
    if r.get("median_ms") is not None:
      r["ms_per_1k_tokens"] = r["median_ms"] / (r["tk"] / 1024)
  add_fits(res)
  return res


def add_fits(res) -> None:
  """res["fits"]: per row and pass, the least-squares line through its timings."""
  fits = res["fits"]
  rows = [r for r in res["rows"] if r["status"] == "ok" and r.get("median_ms") is not None]
  for name in dict.fromkeys(label(r) for r in rows):
    for pass_ in res["settings"]["passes"]:
      pts = [(r["tk"], r["median_ms"]) for r in rows if label(r) == name and r["pass"] == pass_]
      fit = _fit(*zip(*pts)) if len(pts) >= 2 else None
      if fit:
        fits[f"{name} {pass_}"] = {"intercept_ms": fit[0], "ms_per_1k_tokens": fit[1] * 1024,
                                   "r2": fit[2], "points": len(pts)}


def _cell(rows, s, name, pass_) -> str:
  r = next((r for r in rows if r["tk"] == s and label(r) == name and r["pass"] == pass_), None)
  if r is None:
    return "-"
  if r["status"] != "ok" or r.get("median_ms") is None:
    return r["status"] if r["status"] != "ok" else "untimed"
  return f"{r['median_ms']:.3f} ({r['median_ms'] / (s / 1024):.4f})"


def markdown(res) -> str:
  st, env = res["settings"], res["environment"]
  hq, hk, d = st["heads"]
  rows = res["rows"]
  lines = [f"# Sliding window: time vs S, window {st['window']} (causal, left)", "",
           f"{env['device']}, jax {env['jax']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
           f"{env['time']}. B1 Hq{hq} Hk{hk} D{d} {st['dtype']}; median of {st['reps']}. "
           "Every row checked against the fp32 oracle (out, dq, dk, dv).", ""]
  if not res["timings_meaningful"]:
    lines += ["Smoke run (CPU): timings mean nothing.", ""]
  bad = [r for r in rows if r["status"] in ("wrong", "error")]
  for r in bad:
    lines.append(f"- **{r['status'].upper()}** S{r['tk']} {label(r)} {r['pass']}: "
                 f"{r.get('reason', r.get('check', ''))}")
  if bad:
    lines.append("")
  names = list(dict.fromkeys(label(r) for r in rows))
  for pass_ in st["passes"]:
    lines += [f"## {pass_}: ms (ms per 1K tokens)", "",
              "| S | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in st["seqs"]:
      lines.append(f"| {s} | " + " | ".join(_cell(rows, s, n, pass_) for n in names) + " |")
    lines.append("")
  lines += ["## Linear fit time = a + b S", "",
            "| row | a (ms) | b (ms per 1K tokens) | R^2 | points |", "|---|---|---|---|---|"]
  for name, f in res["fits"].items():
    lines.append(f"| {name} | {f['intercept_ms']:.3f} | {f['ms_per_1k_tokens']:.4f} | "
                 f"{f['r2']:.4f} | {f.get('points', '')} |")
  return "\n".join(lines) + "\n"


def plot(res, out_dir) -> list[str]:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib not installed: no plot")
    return []
  passes = res["settings"]["passes"]
  rows = [r for r in res["rows"] if r.get("median_ms") is not None]
  fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
  for ax, pass_ in zip(axes[0], passes):
    for name in dict.fromkeys(label(r) for r in res["rows"]):
      pts = [(r["tk"], r["median_ms"]) for r in rows if label(r) == name and r["pass"] == pass_]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if "full" in name else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("ms")
    ax.set_title(f"{pass_}, window {res['settings']['window']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, "bench_window.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--window", type=int, default=1024, help="left window (keys before the row)")
  ap.add_argument("--seqs", default="8192,16384,32768,65536")
  ap.add_argument("--heads", default="32,8,128", help="Hq,Hk,D")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  ap.add_argument("--backends", default="", help="comma list (default: the GPU kernel backends)")
  ap.add_argument("--passes", default="fwd,fwdbwd", help="comma list of fwd, bwd, fwdbwd")
  ap.add_argument("--sets", type=int, default=2, help="input sets rotated while timing")
  ap.add_argument("--no-full", action="store_true", help="skip the unwindowed contrast rows")
  ap.add_argument("--no-cudnn", action="store_true")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, backends xla,triton")
  ap.add_argument("--out", default="benchmarks/results/window")
  ap.add_argument("--render", metavar="JSON",
                  help="only rewrite the markdown and PNG (and fits) of a saved, possibly "
                       "partial, bench_window.json into --out")
  args = ap.parse_args(argv)
  if args.smoke:
    args.seqs, args.heads, args.window = "64,128", "4,2,32", 16
    args.backends = args.backends or "xla,triton"
    args.reps, args.warmup, args.sets = 1, 0, 1
  args.seqs = [int(x) for x in args.seqs.split(",")]
  args.heads = tuple(int(x) for x in args.heads.split(","))
  args.backends = [b for b in args.backends.split(",") if b]
  unknown = [b for b in args.backends if b not in impls.IMPL_NAMES]
  if unknown:
    ap.error(f"--backends: unknown {unknown}; known: {', '.join(impls.IMPL_NAMES)}")
  given = [p for p in args.passes.split(",") if p]
  bad = set(given) - set(PASSES)
  if bad or not given:
    ap.error(f"--passes: unknown {sorted(bad)}; use {', '.join(PASSES)}")
  args.passes = [p for p in PASSES if p in given]
  if args.window < 0:
    ap.error(f"--window must be >= 0, got {args.window}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.render:
    with open(args.render) as f:
      res = json.load(f)
    res["fits"] = {}
    add_fits(res)
    with open(os.path.join(args.out, "bench_window.json"), "w") as f:
      json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "bench_window.md"), "w") as f:
      f.write(markdown(res))
    plot(res, args.out)
    return res

  def write_json(res):
    with open(os.path.join(args.out, "bench_window.json"), "w") as f:
      json.dump(res, f, indent=1)

  res = run(args, write_json)
  write_json(res)
  with open(os.path.join(args.out, "bench_window.md"), "w") as f:
    f.write(markdown(res))
  plot(res, args.out)
  print(markdown(res))
  return res


if __name__ == "__main__":
  main()
