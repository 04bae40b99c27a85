"""Is sliding-window attention linear in S? Time vs sequence length at a fixed window.

  python -m benchmarks.bench_window --out DIR                 # GPU: S 8K..64K, window 1024
  python -m benchmarks.bench_window --window 4096 --seqs 8192,32768 --out DIR
  python -m benchmarks.bench_window --smoke --out DIR         # CPU, tiny shapes (CI)

Rows per S (B x S x Hq x Hk x D, bf16, causal, ``local_window_size=(window, 0)``):
  <backend>         jax_grouped_attn.attention with the window, per kernel backend
  <backend> full    the first backend without the window (quadratic, for contrast)
  cudnn             jax.nn.dot_product_attention(implementation="cudnn") with the
                    same window (GPU only)
Every windowed row is checked before it is timed: its output on the first and
last ``--check-rows`` rows against the exact fp32 reference of that slice (a
window makes a slice of rows depend only on a slice of keys), and its
gradients on four query heads of an S = ``--grad-check-seq`` problem against
the reference's (calibrated tolerances, jax_grouped_attn/testing.py). The JSON is
rewritten after every row, so a run cut short keeps what it measured. Linearity: ms per 1K tokens at
each S, and the least-squares fit time = a + b * S with its R^2, per row.
Writes bench_window.json, bench_window.md and bench_window.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_grouped_attn as ga  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402
from jax_grouped_attn import registry  # noqa: E402
from jax_grouped_attn.groups import QueryGroup, visible_pairs  # noqa: E402
from jax_grouped_attn.plan import Problem  # noqa: E402
from jax_grouped_attn.reference import reference_attention  # noqa: E402
from jax_grouped_attn.validate import check_window  # noqa: E402

PASSES = ("fwd", "fwdbwd")


def _problem(tq, tk, hq, hk, d, group, window):
  return Problem((group,), 1, tq, tk, hq, hk, d, True, 1.0 / np.sqrt(d), False,
                 check_window(window, True))


def _slice_reference(q, k, v, rows: slice, window: int):
  """Exact out of rows ``rows`` (fp32 and input-dtype references): those rows
  see only keys [start - window, stop), so the reference runs on that slice."""
  lo = max(rows.start - window, 0)
  qs, ks, vs = q[:, rows], k[:, lo:rows.stop], v[:, lo:rows.stop]
  n, nk = qs.shape[1], ks.shape[1]
  p = _problem(n, nk, q.shape[2], k.shape[2], q.shape[3],
               QueryGroup(0, n, rows.start - lo, nk), (window, 0))
  f32 = lambda x: x.astype(jnp.float32)
  want = reference_attention(p, f32(qs), f32(ks), f32(vs))[0]
  lowp = reference_attention(p, qs, ks, vs, compute_dtype=q.dtype)[0]
  return want, lowp


def _check(name, got, want, lowp) -> dict:
  got_np = np.asarray(jnp.asarray(got, jnp.float32))
  c = common.tolerance.check(got_np, np.asarray(want, np.float32), np.asarray(lowp, np.float32),
                             name=name, dtype=jnp.dtype(got.dtype))
  res = c.as_dict()
  if not np.isfinite(got_np).all():
    res["ok"], res["why"] = False, "non-finite values"
  return res


def _grad_check(fn, q, k, v, window) -> dict:
  """Gradients of ``fn`` on 4 query heads / 1 kv head vs the fp32 reference."""
  q, k, v = q[:, :, :4], k[:, :, :1], v[:, :, :1]
  t = q.shape[1]
  p = _problem(t, t, 4, 1, q.shape[3], QueryGroup(0, t, 0, t), (window, 0))
  do = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32).astype(q.dtype)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do.astype(jnp.float32))
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  ref = lambda a, b, c: reference_attention(p, a, b, c)[0]
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  lowp_f = lambda a, b, c: reference_attention(p, a, b, c, compute_dtype=q.dtype)[0]
  lowp = jax.grad(loss(lowp_f), argnums=(0, 1, 2))(q, k, v)
  return {f"d{n}": _check(f"d{n}", g, w, lp) for n, g, w, lp in zip("qkv", got, want, lowp)}


def _impls(backends, window, with_full, with_cudnn):
  """(label, fn(q, k, v) -> out, windowed?) rows; the unwindowed contrast
  row for the first backend only (one quadratic curve is enough)."""
  rows = []
  for i, b in enumerate(backends):
    rows.append((b, lambda q, k, v, b=b: ga.attention(
        q, k, v, causal=True, local_window_size=(window, 0), backend=b), True))
    if with_full and i == 0:
      rows.append((f"{b} full", lambda q, k, v, b=b: ga.attention(
          q, k, v, causal=True, backend=b), False))
  if with_cudnn:
    rows.append(("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window, 0), implementation="cudnn"), True))
  return rows


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
  env = common.environment()
  gpu = common.on_gpu()
  hq, hk, d = args.heads
  backends = args.backends or [b for b in ("pallas_mosaic", "triton")
                               if registry.get(b).unavailable(jax.default_backend()) is None]
  impls = _impls(backends, args.window, not args.no_full, gpu and not args.no_cudnn)
  results, fits = [], {}
  res = {"environment": env, "timings_meaningful": gpu and not args.smoke,
         "settings": {"window": args.window, "heads": args.heads, "dtype": args.dtype,
                      "seqs": args.seqs, "passes": args.passes, "reps": args.reps},
         "rows": results, "fits": fits, "grad_checks": {}}
  dt = jnp.dtype(args.dtype)
  for label, fn, windowed in impls:   # gradients once per windowed row, on a small problem
    if windowed:
      ks = jax.random.split(jax.random.PRNGKey(1), 3)
      t = args.grad_check_seq
      q, k, v = (jax.random.normal(kk, (1, t, h, d), jnp.float32).astype(dt)
                 for kk, h in zip(ks, (hq, hk, hk)))
      try:
        res["grad_checks"][label] = _grad_check(fn, q, k, v, args.window)
      except Exception as e:  # noqa: BLE001 -- reported in the row
        res["grad_checks"][label] = {"error": f"{type(e).__name__}: {e}"[:600]}
  for s in args.seqs:
    key = jax.random.PRNGKey(s)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, s, hq, d), jnp.float32).astype(dt)
    k = jax.random.normal(kk, (1, s, hk, d), jnp.float32).astype(dt)
    v = jax.random.normal(kv, (1, s, hk, d), jnp.float32).astype(dt)
    do = jax.random.normal(kd, q.shape, jnp.float32).astype(dt)
    n = min(args.check_rows, s)
    slices = [slice(0, n), slice(s - n, s)]
    refs = [_slice_reference(q, k, v, sl, args.window) for sl in slices]
    pairs = visible_pairs((QueryGroup(0, s, 0, s),), True, check_window((args.window, 0), True))
    full_pairs = visible_pairs((QueryGroup(0, s, 0, s),), True)
    for label, fn, windowed in impls:
      row = {"seq": s, "impl": label, "windowed": windowed, "passes": {}}
      try:
        fwd = jax.jit(fn)
        out = fwd(q, k, v)
        if windowed:
          row["check"] = {f"out[{sl.start}:{sl.stop}]": _check("out", out[:, sl], *ref)
                          for sl, ref in zip(slices, refs)}
          row["check"].update(res["grad_checks"][label])
          bad = {n_: c.get("why", c.get("error")) for n_, c in row["check"].items()
                 if not c.get("ok")}
          if bad:
            raise AssertionError(f"check failed: {bad}")
        del out
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
            fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32)), argnums=(0, 1, 2)))
        for pass_ in args.passes:
          f = fwd if pass_ == "fwd" else grad
          t = common.time_calls(f, [(q, k, v)], reps=args.reps, warmup=args.warmup)
          flops = 4.0 * (pairs if windowed else full_pairs) * d * hq
          flops *= common.PASS_FLOP_FACTOR[pass_]
          row["passes"][pass_] = {**t, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12,
                                  "ms_per_1k_tokens": t["median_ms"] / (s / 1024)}
        row["status"] = "ok"
      except Exception as e:  # noqa: BLE001 -- one row's failure is reported, not fatal
        row["status"], row["reason"] = "error", f"{type(e).__name__}: {e}"[:600]
        traceback.print_exc()
      results.append(row)
      times = {p: f"{r['median_ms']:.3f} ms" for p, r in row["passes"].items()}
      log(f"S{s:<7} {label:<22} {row['status']:<6} {times} {row.get('reason', '')}")
      on_row(res)
  add_fits(res)
  return res


def add_fits(res) -> None:
  """res["fits"]: per row and pass, the least-squares line through its timings."""
  fits = res["fits"]
  rows = res["rows"]
  for label in dict.fromkeys(r["impl"] for r in rows):
    for pass_ in res["settings"]["passes"]:
      pts = [(r["seq"], r["passes"][pass_]["median_ms"]) for r in rows
             if r["impl"] == label and r["status"] == "ok" and pass_ in r["passes"]]
      fit = _fit(*zip(*pts)) if len(pts) >= 2 else None
      if fit:
        fits[f"{label} {pass_}"] = {"intercept_ms": fit[0], "ms_per_1k_tokens": fit[1] * 1024,
                                    "r2": fit[2], "points": len(pts)}


def markdown(res) -> str:
  st, env = res["settings"], res["environment"]
  hq, hk, d = st["heads"]
  lines = [f"# Sliding window: time vs S, window {st['window']} (causal, left)", "",
           f"{env['device']}, jax {env['jax']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
           f"{env['time']}. B1 Hq{hq} Hk{hk} D{d} {st['dtype']}; median of {st['reps']}.", ""]
  if not res["timings_meaningful"]:
    lines += ["Smoke run (CPU): timings mean nothing.", ""]
  for pass_ in st["passes"]:
    impls = list(dict.fromkeys(r["impl"] for r in res["rows"]))
    lines += [f"## {pass_}: ms (ms per 1K tokens)", "",
              "| S | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for s in st["seqs"]:
      cells = []
      for impl in impls:
        r = next((r for r in res["rows"] if r["seq"] == s and r["impl"] == impl), None)
        p = r and r["passes"].get(pass_)
        cells.append(f"{p['median_ms']:.3f} ({p['ms_per_1k_tokens']:.4f})" if p
                     else (r or {}).get("status", "-"))
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
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
  fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
  for ax, pass_ in zip(axes[0], passes):
    for impl in dict.fromkeys(r["impl"] for r in res["rows"]):
      pts = [(r["seq"], r["passes"][pass_]["median_ms"]) for r in res["rows"]
             if r["impl"] == impl and pass_ in r["passes"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl, linestyle="--" if "full" in impl else "-")
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
  ap.add_argument("--passes", default="fwd,fwdbwd")
  ap.add_argument("--check-rows", type=int, default=512)
  ap.add_argument("--grad-check-seq", type=int, default=2048)
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
    args.seqs, args.heads, args.window, args.check_rows = "64,128", "4,2,32", 16, 24
    args.grad_check_seq = 64
    args.backends = args.backends or "xla,triton"
    args.reps, args.warmup = 1, 0
  args.seqs = [int(x) for x in args.seqs.split(",")]
  args.heads = tuple(int(x) for x in args.heads.split(","))
  args.backends = [b for b in args.backends.split(",") if b]
  args.passes = [p for p in args.passes.split(",") if p]
  bad = set(args.passes) - set(PASSES)
  if bad:
    ap.error(f"--passes: unknown {sorted(bad)}; use {', '.join(PASSES)}")
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
