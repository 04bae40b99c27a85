"""Summaries, markdown and plots of a benchmark run (bench.json -> bench.md, *.png)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import statistics

import numpy as np

from jax_grouped_attn import registry
from jax_grouped_attn.backend import Backend

MIB = 1 << 20
GROUPED = tuple(b.name for b in registry.kernel_entries())
# Entries with a backward of their own under deterministic=False (bench rows
# "<name>-nondet"): those whose registry entry has a non-deterministic config.
NONDET = tuple(b.name for b in registry.kernel_entries()
               if type(b).nondeterministic_config is not Backend.nondeterministic_config)
_PASS_ORDER = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
_IMPL_ORDER = (GROUPED + tuple(f"{n}-nondet" for n in NONDET)
               + tuple(f"{n}-2launch" for n in GROUPED)
               + tuple(f"{n}+padv" for n in GROUPED)
               + ("cudnn", "cudnn+padv", "jax-pallas-mha", "xla"))
# The cuDNN row a row is compared with: plain, else (v with a head_dim of its
# own, which jax.nn's cuDNN refuses) v zero-padded, the way users run it.
CUDNN_ROWS = ("cudnn", "cudnn+padv")


def _cudnn_ms(ms: dict):
  """The first of CUDNN_ROWS in ``ms`` ({impl: ms}), else None."""
  return next((ms[n] for n in CUDNN_ROWS if n in ms), None)


def _impl_order(name: str) -> int:
  return _IMPL_ORDER.index(name) if name in _IMPL_ORDER else len(_IMPL_ORDER)


def _seq_label(n: int) -> str:
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# ------------------------------------------------------------------ json ---

def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(results: dict, out_dir: str) -> str:
  path = os.path.join(out_dir, "bench.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(results), f, indent=1)
  os.replace(tmp, path)
  return path


def kernel_configs(plan) -> dict:
  """The default (tuned or heuristic) kernel configs the kernel rows ran with
  (looked up as jax_grouped_attn.autodiff does: head_dims, backend, dtype)."""
  from jax_grouped_attn import registry, tuning  # noqa: PLC0415
  out = {"tuned_table": tuning.table_path(), "gpu": tuning.gpu_name()}
  for item in plan:
    wl = item.wls[0]
    for backend in GROUPED:
      dims = f"D{wl.d}" + ("" if wl.dv is None else f" Dv{wl.dv}")
      key = f"{backend} {dims} {wl.dtype}"
      if key in out:
        continue
      cfgs = {p: registry.default_config(backend, p, wl.d, seq_len=wl.tk, dtype=wl.dtype,
                                         head_dim_v=wl.dv)
              for p in ("forward", "backward")}
      out[key] = {p: None if c is None else dataclasses.asdict(c) for p, c in cfgs.items()}
  return out


# ------------------------------------------------------------- summaries ---

def _timed(rows):
  return [r for r in rows if r.get("median_ms") is not None]


def series_stats(rows) -> dict:
  """(series, pass, impl) -> slowest/mean/fastest rank time and TF/s of the slowest."""
  groups = collections.defaultdict(list)
  for r in _timed(rows):
    groups[(r["series"], r["pass"], r["impl"])].append(r)
  stats = {}
  for key, rs in groups.items():
    ms = [r["median_ms"] for r in rs]
    slow = max(rs, key=lambda r: r["median_ms"])
    world = rs[0]["world"] or 1
    mean = statistics.fmean(ms)
    stats[key] = {
        "series": key[0], "pass": key[1], "impl": key[2], "family": rs[0]["family"],
        "world": rs[0]["world"], "seq": rs[0]["seq"] or rs[0]["tk"],
        "ranks_timed": len(rs), "complete": len(rs) == world,
        "slowest_ms": slow["median_ms"], "slowest_rank": slow["rank"],
        "mean_ms": mean, "fastest_ms": min(ms),
        "spread": (max(ms) - min(ms)) / mean if mean else 0.0,
        "max_over_mean": max(ms) / mean if mean else 0.0,
        "tflops": slow["flops"] / (slow["median_ms"] * 1e-3) / 1e12,
        "all_ok": all(r["status"] == "ok" for r in rs),
        "rank_ms": {int(r["rank"]): r["median_ms"] for r in rs},
    }
  return stats


def _missing(headline: dict, good: list[dict]) -> list[str]:
  """The implementations of a headline pair without a correct, complete timing."""
  have = {s["impl"] for s in good}
  return [headline[k] for k in ("primary", "cudnn") if headline.get(k) and headline[k] not in have]


def fastest(stats, headlines=()) -> list[dict]:
  """Per (series, pass): implementations ranked (correct and all ranks timed).
  A headline series (``headlines``: bench's {"series", "primary", "cudnn"})
  whose pair is not both there names no winner: it is marked incomplete."""
  by = collections.defaultdict(list)
  for s in stats.values():
    if s["family"] == "contiguous":
      continue
    by[(s["series"], s["pass"])].append(s)
  heads = {h["series"]: h for h in headlines}
  for h in heads.values():
    for p in _PASS_ORDER:
      if any(k[1] == p for k in by) and (h["series"], p) not in by:
        by[(h["series"], p)] = []
  out = []
  for (series, pass_), ss in by.items():
    good = sorted((s for s in ss if s["all_ok"] and s["complete"]), key=lambda s: s["slowest_ms"])
    missing = _missing(heads[series], good) if series in heads else []
    if missing:
      out.append({"series": series, "pass": pass_, "fastest": None, "incomplete": missing,
                  "ms": None, "tflops": None, "runner_up": None, "runner_up_ratio": None,
                  "ranking": [(s["impl"], s["slowest_ms"]) for s in good], "cudnn_ratio": None,
                  "two_launch_ratio": None})
      continue
    if not good:
      continue
    best = good[0]
    ms = {s["impl"]: s["slowest_ms"] for s in good}
    cudnn = _cudnn_ms(ms)
    two = min((v for k, v in ms.items() if k.endswith("-2launch")), default=None)
    out.append({
        "series": series, "pass": pass_, "fastest": best["impl"], "ms": best["slowest_ms"],
        "tflops": best["tflops"],
        "runner_up": good[1]["impl"] if len(good) > 1 else None,
        "runner_up_ratio": good[1]["slowest_ms"] / best["slowest_ms"] if len(good) > 1 else None,
        "ranking": [(s["impl"], s["slowest_ms"]) for s in good],
        "cudnn_ratio": cudnn / best["slowest_ms"] if cudnn else None,
        "two_launch_ratio": two / best["slowest_ms"] if two else None,
    })
  return out


def balance(results, stats) -> list[dict]:
  """Zigzag vs contiguous per-rank times with a stated all-gather model."""
  bw = results["settings"].get("nvlink_gbps", 450.0) * 1e9
  rows = results["rows"]
  out = []
  for key, ct in stats.items():
    series, pass_, impl = key
    if ct["family"] != "contiguous" or pass_ not in ("fwd", "fwdbwd"):
      continue
    zz = stats.get((series.replace("contiguous", "zigzag", 1), pass_, impl))
    if zz is None:
      continue
    sample = next(r for r in rows if r["series"] == series)
    w, s = sample["world"], sample["seq"]
    itemsize = 2 if sample["dtype"] in ("bfloat16", "float16") else 4
    dims = sample["d"] + (sample.get("dv") or sample["d"])   # k's and v's head_dims
    kv_bytes = sample["batch"] * s * sample["hk"] * dims * itemsize * (w - 1) / w
    # fwd: all-gather K,V; fwd+bwd: plus reduce-scatter of dK,dV (same bytes),
    # gathered K,V kept from the forward for the backward.
    comm_ms = kv_bytes / bw * 1e3 * (2 if pass_ == "fwdbwd" else 1)
    # Both schemes do the same total work: the smaller mean rank time is the
    # best per-device time perfect balance could give.
    ideal = min(zz["mean_ms"], ct["mean_ms"])
    entry = {"series": series.replace("contiguous ", ""), "world": w, "seq": s, "pass": pass_,
             "impl": impl, "kv_bytes_gathered": kv_bytes, "comm_ms": comm_ms,
             "zigzag_rank_ms": zz["rank_ms"], "contiguous_rank_ms": ct["rank_ms"],
             "complete": zz["complete"] and ct["complete"]}
    for name, st in (("zigzag", zz), ("contiguous", ct)):
      entry[f"{name}_max_ms"] = st["slowest_ms"]
      entry[f"{name}_max_over_mean"] = st["max_over_mean"]
      entry[f"{name}_eff_no_overlap"] = ideal / (st["slowest_ms"] + comm_ms)
      entry[f"{name}_eff_overlap"] = ideal / max(st["slowest_ms"], comm_ms)
    entry["comm_over_compute"] = comm_ms / zz["slowest_ms"]
    out.append(entry)
  out.sort(key=lambda e: (e["world"], e["seq"], e["pass"]))
  return out


# -------------------------------------------------------- sliding window ---

def window_label(row: dict) -> str:
  """A window-family row's curve: its implementation, "<impl> full" for the
  contrast without the window."""
  return row["impl"] if row.get("window") else f"{row['impl']} full"


def _window_rows(rows) -> list[dict]:
  return [r for r in rows if r["family"] == "window"]


def _window_curves(rows) -> list[str]:
  """The curves of window rows: the windowed implementations, then the contrasts."""
  first = {}
  for r in rows:
    first.setdefault(window_label(r), (not r.get("window"), _impl_order(r["impl"])))
  return sorted(first, key=first.get)


def linear_fit(seqs, times):
  """Least squares time = a + b * S: (a, b, R^2); None with fewer than two S."""
  s, t = np.asarray(seqs, float), np.asarray(times, float)
  if len(set(s.tolist())) < 2:
    return None
  b, a = np.polyfit(s, t, 1)
  ss = float(((t - t.mean()) ** 2).sum())
  r2 = 1.0 - float(((t - (a + b * s)) ** 2).sum()) / ss if ss > 0 else 1.0
  return float(a), float(b), r2


def window_fits(rows, passes) -> dict:
  """"<curve> <pass>" -> the least-squares line through the window family's
  correct timings: row (the curve, window_label), pass, intercept_ms,
  ms_per_1k_tokens (the slope), r2 and points."""
  ok = [r for r in _timed(_window_rows(rows)) if r["status"] == "ok"]
  fits = {}
  for name in _window_curves(ok):
    for p in passes:
      pts = [(r["tk"], r["median_ms"]) for r in ok if window_label(r) == name and r["pass"] == p]
      fit = linear_fit(*zip(*pts)) if pts else None
      if fit:
        fits[f"{name} {p}"] = {"row": name, "pass": p, "intercept_ms": fit[0],
                               "ms_per_1k_tokens": fit[1] * 1024, "r2": fit[2],
                               "points": len(pts)}
  return fits


def _window_cell(rows, seq: int, name: str, pass_: str) -> str:
  r = next((r for r in rows if r["tk"] == seq and window_label(r) == name
            and r["pass"] == pass_), None)
  if r is None:
    return "–"
  if r["status"] != "ok":
    return "**WRONG**" if r["status"] == "wrong" else r["status"]
  if r.get("median_ms") is None:
    return "untimed"
  return f"{r['median_ms']:.3f} ({r['median_ms'] / (seq / 1024):.4f})"


def _window_section(rows, fits: dict, passes) -> list[str]:
  """bench.md's window-family section: ms per S, the contrast, the fits."""
  win = _window_rows(rows)
  if not win:
    return []
  lefts = sorted({r["window"][0] for r in win if r.get("window")})
  shapes = sorted({f"B{r['batch']} Hq{r['hq']} Hk{r['hk']} D{r['d']} {r['dtype']}"
                   for r in win})
  md = ["## Sliding window: time vs S", "",
        f"Causal with a left window of {', '.join(map(str, lefts))} keys "
        f"(local_window_size=(W, 0)), {'; '.join(shapes)}. Rows named \"full\": the same call "
        "without the window (quadratic in S), for contrast. Cells: ms (ms per 1K tokens). "
        "Linear in S: ms per 1K tokens flat, the fit's R² near 1.", ""]
  bad = [r for r in win if r["status"] in ("wrong", "error") and r["pass"] != "bwd"]
  for r in bad:
    md.append(f"- **{r['status'].upper()}** S{r['tk']} {window_label(r)} {r['pass']}: "
              f"{r.get('reason') or _err_text(r.get('check'))}")
  if bad:
    md.append("")
  names = _window_curves(win)
  seqs = sorted({r["tk"] for r in win})
  for p in passes:
    md += [f"### {p}: ms (ms per 1K tokens)", ""]
    md += _table(["S"] + names, [[s] + [_window_cell(win, s, n, p) for n in names]
                                 for s in seqs])
  if fits:
    md += ["### Linear fit time = a + b·S (correct rows)", ""]
    md += _table(["row", "pass", "a (ms)", "b (ms per 1K tokens)", "R²", "points"],
                 [[f["row"], f["pass"], _f(f["intercept_ms"]), _f(f["ms_per_1k_tokens"], "{:.4f}"),
                   _f(f["r2"], "{:.4f}"), f["points"]] for f in fits.values()])
  return md


# -------------------------------------------------------------- markdown ---

def _f(x, fmt="{:.3f}", none="–"):
  return none if x is None else fmt.format(x)


def _table(header, rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines + [""]


def _err_text(check) -> str:
  """Each tensor's max |x - exact| / max |exact| (whole tensors)."""
  if not check:
    return "–"
  return ", ".join(f"{k} {rel_err(c):.1e}" if rel_err(c) is not None else f"{k} {c.get('why')}"
                   for k, c in check.items())


def rel_err(entry: dict | None) -> float | None:
  """A check entry's max error relative to the tensor's scale (max |reference|);
  older files kept only the absolute error and the reference's max |x|."""
  if not entry:
    return None
  if entry.get("max_err") is not None:
    return entry["max_err"]
  if entry.get("max_abs_err") is not None and entry.get("ref_max_abs"):
    return entry["max_abs_err"] / entry["ref_max_abs"]
  return None


def environment_text(env: dict) -> str:
  """The device and the versions that decide the numbers (common.environment), one line."""
  return (f"device: {env['device']} ({env['platform']}); jax {env['jax']}, "
          f"jaxlib {env['jaxlib']}, triton {env['triton']}, jax-triton {env['jax_triton']}, "
          f"cudnn {env['cudnn']}")


def timing_text(settings: dict) -> str:
  """How the run timed its calls."""
  if "rounds" not in settings:
    return (f"median of {settings.get('reps')} calls, each synchronised on its own "
            "(per-call timing)")
  calls = settings.get("calls") or "enough for ~25 ms"
  return (f"device time per call: median over {settings['rounds']} rounds of {calls} "
          "back-to-back calls, one sync per round")


def markdown(results, stats, best, bal) -> str:
  env = results["environment"]
  rows = results["rows"]
  md = [f"# Attention benchmark: {env['device']}", ""]
  md.append(f"jax {env['jax']}, jaxlib {env['jaxlib']}, triton {env['triton']}, "
            f"jax-triton {env['jax_triton']}, cuDNN {env['cudnn']}; mode **{results['mode']}**; "
            f"{timing_text(results['settings'])}; {env['time']}.")
  md.append("")
  if not results["timings_meaningful"]:
    md += ["> **No GPU: timings here mean nothing** (tiny shapes, interpret mode). "
           "The error columns are the point of this run.", ""]
  md += ["TF/s count visible (query, key) pairs only (4·pairs·D per batch·head forward; "
         "bwd 2.5x, fwd+bwd 3.5x; with v's own head_dim Dv each matmul at its own: "
         "forward 2·pairs·(D + Dv)). bwd = fwdbwd − fwd. Zigzag rows: the slowest rank. "
         "Errors: max |x − exact fp32| / max |exact| over the whole tensor (every batch row, "
         "head and query row); lse where the implementation returns it in fp32.", ""]

  md += ["## Which implementation is fastest", ""]
  md += ["Ratios are times relative to the fastest (2.00x = takes twice as long).", ""]
  md += _table(["workload", "pass", "fastest", "ms", "TF/s", "runner-up", "runner-up time",
                "cuDNN time", "best two-launch time"],
               [[b["series"], b["pass"],
                 f"**{b['fastest']}**" if b["fastest"] else
                 "incomplete: no " + ", ".join(b["incomplete"]), _f(b["ms"]),
                 _f(b["tflops"], "{:.1f}"),
                 b["runner_up"] or "–", _f(b["runner_up_ratio"], "{:.2f}x"),
                 _f(b["cudnn_ratio"], "{:.2f}x"), _f(b["two_launch_ratio"], "{:.2f}x")]
                for b in best])

  standard = [r for r in rows if r["family"] in ("causal", "custom")]
  if standard:
    md += ["## Standard causal attention", ""]
    by_pass = collections.defaultdict(dict)
    for r in _timed(standard):
      if r["impl"] in CUDNN_ROWS and r["status"] == "ok":
        by_pass[(r["workload"], r["pass"])][r["impl"]] = r["median_ms"]
    cud = {k: _cudnn_ms(ms) for k, ms in by_pass.items()}
    md += _table(["workload", "impl", "pass", "ms", "TF/s", "speed-up vs cuDNN", "status",
                  "errors", "peak MiB"],
                 [[r["workload"], r["impl"], r["pass"], _f(r.get("median_ms")),
                   _f(r.get("tflops"), "{:.1f}"),
                   _f(cud[(r["workload"], r["pass"])] / r["median_ms"]
                      if r.get("median_ms") and (r["workload"], r["pass"]) in cud else None,
                      "{:.2f}x"),
                   r["status"], _err_text(r.get("check")),
                   _f((r.get("memory") or {}).get("peak_memory_bytes", None) and
                      r["memory"]["peak_memory_bytes"] / MIB, "{:.0f}")]
                  for r in standard if r["status"] != "skipped"])
    if any(r.get("dv") for r in standard):
      md += ["Rows named Dv: v's head_dim of its own; jax.nn's cuDNN refuses it, so their "
             "cuDNN is cudnn+padv (v zero-padded to q/k's head_dim, out sliced).", ""]

  passes = sorted(results["settings"]["passes"], key=lambda p: _PASS_ORDER.get(p, 9))
  fits = results.get("window_fits")
  md += _window_section(rows, window_fits(rows, passes) if fits is None else fits, passes)

  zz = [s for s in stats.values() if s["family"] == "zigzag"]
  if zz:
    md += ["## Zigzag context parallelism (per rank: 2 groups, full K,V)", ""]
    two = {(s["series"], s["pass"], s["impl"].split("-")[0]): s["slowest_ms"]
           for s in zz if s["impl"].endswith("-2launch")}
    cud = {(s["series"], s["pass"]): s["slowest_ms"] for s in zz if s["impl"] == "cudnn"}
    md += _table(["series", "impl", "pass", "slowest rank ms", "mean ms", "spread", "TF/s",
                  "vs own two-launch", "vs cuDNN composition", "ranks", "correct"],
                 [[s["series"], s["impl"], s["pass"], _f(s["slowest_ms"]), _f(s["mean_ms"]),
                   f"{100 * s['spread']:.1f}%", _f(s["tflops"], "{:.1f}"),
                   _f(two[(s["series"], s["pass"], s["impl"])] / s["slowest_ms"]
                      if (s["series"], s["pass"], s["impl"]) in two else None, "{:.2f}x"),
                   _f(cud[(s["series"], s["pass"])] / s["slowest_ms"]
                      if (s["series"], s["pass"]) in cud else None, "{:.2f}x"),
                   f"{s['ranks_timed']}/{s['world']}", "yes" if s["all_ok"] else "**NO**"]
                  for s in sorted(zz, key=lambda s: (s["world"], s["seq"],
                                                     _PASS_ORDER.get(s["pass"], 9),
                                                     _impl_order(s["impl"])))])
    md += ["Speed-ups > 1 mean the row is faster. The cuDNN composition is, per group, a "
           "non-causal call over the kv prefix plus a causal call over the diagonal chunk, "
           "merged by log-sum-exp (fp32 lse from jax's cuDNN rule; exact merged backward).", ""]

  if bal:
    bw = results["settings"].get("nvlink_gbps", 450.0)
    md += ["## Load balance: zigzag vs contiguous sharding", ""]
    md += [f"Model (an assumption, not a measurement): each rank all-gathers K,V over NVLink "
           f"at **{bw:.0f} GB/s** one direction per GPU; bytes = 2·B·S·Hk·D·itemsize·(W−1)/W. "
           "fwd+bwd adds a reduce-scatter of dK,dV of the same size (gathered K,V kept for "
           "the backward). Ideal per-device time = the smaller of the two schemes' mean "
           "rank times (same total work); efficiency = ideal / "
           "step time, with the step = slowest rank + communication (no overlap) or "
           "max(slowest rank, communication) (perfect overlap).", ""]
    md += _table(["W", "S", "pass", "impl", "zigzag max/mean", "contiguous max/mean",
                  "zigzag slowest ms", "contiguous slowest ms", "comm ms", "comm/compute",
                  "eff zigzag (no overlap / overlap)", "eff contiguous (no overlap / overlap)"],
                 [[e["world"], e["seq"], e["pass"], e["impl"],
                   _f(e["zigzag_max_over_mean"], "{:.2f}"),
                   _f(e["contiguous_max_over_mean"], "{:.2f}"), _f(e["zigzag_max_ms"]),
                   _f(e["contiguous_max_ms"]), _f(e["comm_ms"]),
                   _f(e["comm_over_compute"], "{:.2f}"),
                   f"{100 * e['zigzag_eff_no_overlap']:.0f}% / "
                   f"{100 * e['zigzag_eff_overlap']:.0f}%",
                   f"{100 * e['contiguous_eff_no_overlap']:.0f}% / "
                   f"{100 * e['contiguous_eff_overlap']:.0f}%"] for e in bal])
    for e in bal:
      ranks = sorted(e["zigzag_rank_ms"])
      md.append(f"- W{e['world']} S{e['seq']} {e['pass']} ({e['impl']}) per-rank ms, zigzag: "
                + ", ".join(_f(e["zigzag_rank_ms"][r], "{:.2f}") for r in ranks)
                + "; contiguous: "
                + ", ".join(_f(e["contiguous_rank_ms"].get(r), "{:.2f}") for r in ranks))
    md.append("")

  md += ["## Correctness (worst over ranks)", ""]
  worst = {}
  for r in rows:
    if r.get("check") is None or r["pass"] == "bwd":
      continue
    key = (r["series"], r["impl"], r["pass"])
    prev = worst.get(key)
    errs = {k: rel_err(c) or 0.0 for k, c in r["check"].items()}
    if prev is None:
      worst[key] = (errs, r["status"] == "ok")
    else:
      worst[key] = ({k: max(v, prev[0].get(k, 0.0)) for k, v in errs.items()},
                    prev[1] and r["status"] == "ok")
  md += _table(["series", "impl", "pass", "max |error| / max |exact|", "within tolerance"],
               [[k[0], k[1], k[2], ", ".join(f"{n} {v:.1e}" for n, v in e.items()),
                 "yes" if ok else "**NO**"] for k, (e, ok) in worst.items()])

  phases = phase_totals(rows)
  if phases:
    md += ["## Where the time went (seconds)", ""]
    md += ["Summed over each implementation's runs. inputs and oracle are paid once per "
           "workload, by its first run; compile, check and time are per pass (fwd + fwdbwd); "
           "a compile started ahead on another thread (--compile-threads) overlaps earlier "
           "runs, and the run waited only for what was left of it.", ""]
    cols = ("inputs_s", "oracle_s", "oracle_compile_s", "build_s", "compile_s",
            "compile_wait_s", "check_s", "time_s", "run_s")
    md += _table(["impl", "runs", "inputs", "oracle", "of it compile", "build", "compile",
                  "waited for it", "check", "time", "total"],
                 [[impl, t["runs"]] + [_f(t.get(c, 0.0), "{:.1f}") for c in cols]
                  for impl, t in phases.items()])

  skipped = collections.OrderedDict()
  for r in rows:
    if r["status"] in ("skipped", "error"):
      skipped.setdefault((r["impl"], r["status"], r.get("reason", "")), []).append(r["series"])
  if skipped:
    md += ["## Skipped or failed", ""]
    for (impl, status, reason), series in skipped.items():
      n = len(set(series))
      md.append(f"- **{impl}** {status}: {reason} ({n} workload{'s' if n > 1 else ''})")
    md.append("")
  return "\n".join(md)


def phase_totals(rows) -> dict:
  """impl -> runs and seconds per phase (bench rows' ``phases``), summed over
  passes and runs; implementations in the order they first ran."""
  out = {}
  for r in rows:
    ph = r.get("phases")
    if not ph:
      continue
    t = out.setdefault(r["impl"], {"runs": 0})
    if "run_s" in ph:
      t["runs"] += 1
    for k, v in ph.items():
      t[k] = t.get(k, 0.0) + v
  return out


# ----------------------------------------------------------------- plots ---

def _seq_axes(ax, seqs, xlabel, ylabel, title, legend) -> None:
  """A log2 sequence-length x axis labelled 8K, 16K, ..., and the rest of the frame."""
  ax.set_xscale("log", base=2)
  xs = sorted(seqs)
  ax.set_xticks(xs)
  ax.set_xticklabels([_seq_label(x) for x in xs])
  ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=legend)


def _save(plt, fig, out_dir, name, title) -> str:
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plots(results, stats, out_dir) -> list[str]:
  """PNG plots; returns the files written (none without matplotlib)."""
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib not installed: no plots")
    return []
  written = []
  suffix = "" if results["timings_meaningful"] else " (NO GPU: timings meaningless)"
  passes = [p for p in ("fwd", "fwdbwd", "bwd") if p in results["settings"]["passes"]]

  # 1) TF/s vs sequence length, standard causal shapes.
  std = [r for r in _timed(results["rows"]) if r["family"] in ("causal", "custom")
         and r["status"] == "ok"]
  if std:
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, p in zip(axes[0], passes):
      lines = collections.defaultdict(list)
      for r in std:
        if r["pass"] == p:
          dv = f" Dv{r['dv']}" if r.get("dv") else ""
          lines[(r["impl"], f"B{r['batch']} Hq{r['hq']} Hk{r['hk']} D{r['d']}{dv}")].append(
              (r["tk"], r["tflops"]))
      for (impl, heads), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{impl} {heads}")
      _seq_axes(ax, {r["tk"] for r in std}, "sequence length", "TFLOP/s (visible pairs)",
                f"causal {p}", legend=7)
    written.append(_save(plt, fig, out_dir, "bench_tflops_vs_seq.png",
                         f"TF/s vs sequence length{suffix}"))

  # 2) Grouped vs two-launch vs cuDNN composition (zigzag, slowest rank).
  zz = [s for s in stats.values() if s["family"] == "zigzag" and s["all_ok"]]
  if zz:
    series = sorted({s["series"] for s in zz}, key=lambda x: ([int(t[1:]) for t in x.split()[1:3]]))
    impl_names = [n for n in _IMPL_ORDER if n != "jax-pallas-mha"
                  and any(s["impl"] == n for s in zz)]
    fig, axes = plt.subplots(1, len(passes),
                             figsize=(max(6, 1.6 * len(series) + 3) * len(passes) / 1.5, 4.5),
                             squeeze=False)
    width = 0.8 / max(1, len(impl_names))
    for ax, p in zip(axes[0], passes):
      for i, name in enumerate(impl_names):
        vals = [next((s["tflops"] for s in zz if s["series"] == se and s["pass"] == p
                      and s["impl"] == name), 0.0) for se in series]
        ax.bar(np.arange(len(series)) + i * width, vals, width,
               label=name + (" (composition)" if name == "cudnn" else ""))
      ax.set_xticks(np.arange(len(series)) + width * (len(impl_names) - 1) / 2)
      ax.set_xticklabels([se.split()[1] + " S" + _seq_label(int(se.split()[2][1:]))
                          for se in series],
                         rotation=30, fontsize=8)
      ax.set_ylabel("TFLOP/s of the slowest rank")
      ax.set_title(f"zigzag {p}", fontsize=9)
      ax.grid(True, axis="y", alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f"Grouped (one launch) vs two-launch vs cuDNN composition, slowest rank{suffix}",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "bench_grouped_vs_baselines.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

  # 3) Per-rank time, zigzag vs contiguous.
  bal = [e for e in results.get("balance", []) if e["pass"] == "fwd"] or results.get("balance", [])
  if bal:
    fig, axes = plt.subplots(1, len(bal), figsize=(5 * len(bal), 4), squeeze=False)
    for ax, e in zip(axes[0], bal):
      ranks = sorted(set(e["zigzag_rank_ms"]) | set(e["contiguous_rank_ms"]), key=int)
      x = np.arange(len(ranks))
      ax.bar(x - 0.2, [e["zigzag_rank_ms"].get(r, 0) for r in ranks], 0.4, label="zigzag")
      ax.bar(x + 0.2, [e["contiguous_rank_ms"].get(r, 0) for r in ranks], 0.4, label="contiguous")
      ax.set_xticks(x)
      ax.set_xticklabels([str(r) for r in ranks])
      ax.set_xlabel("rank")
      ax.set_ylabel("ms")
      ax.set_title(f"W{e['world']} S{_seq_label(e['seq'])} {e['pass']} ({e['impl']})", fontsize=9)
      ax.legend(fontsize=8)
    fig.suptitle(f"Per-rank time: zigzag vs contiguous sharding{suffix}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "bench_load_balance.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

  # 4) The window family: ms vs S per curve (log-log; slope 1 = linear), the
  # contrast without the window dashed.
  win = [r for r in _timed(_window_rows(results["rows"])) if r["status"] == "ok"]
  if win:
    lefts = ", ".join(str(x) for x in sorted({r["window"][0] for r in win if r.get("window")}))
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, p in zip(axes[0], passes):
      for name in _window_curves(win):
        pts = sorted((r["tk"], r["median_ms"], bool(r.get("window"))) for r in win
                     if window_label(r) == name and r["pass"] == p)
        if pts:
          ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=name,
                  linestyle="-" if pts[0][2] else "--")
      ax.set_yscale("log", base=2)
      _seq_axes(ax, {r["tk"] for r in win}, "sequence length S", "ms", f"{p}, window {lefts}",
                legend=8)
    written.append(_save(plt, fig, out_dir, "bench_window.png",
                         f"Sliding window: time vs S{suffix}"))
  return written


def console_summary(results) -> list[str]:
  """A few lines for the terminal: per headline series, ours and cuDNN per pass,
  the ratio and whether both were correct; then what was skipped or wrong."""
  stats = {k: v for k, v in series_stats(results["rows"]).items()}
  lines = [f"{'workload':<40} {'pass':<6} {'ours':<14} {'ms':>9} {'cuDNN ms':>9} "
           f"{'cuDNN/ours':>10}  check"]
  for h in results.get("headlines", ()):
    for p in ("fwd", "fwdbwd"):
      if p not in results["settings"]["passes"] or not (h["primary"] or h.get("cudnn")):
        continue
      ours = stats.get((h["series"], p, h["primary"] or ""))
      cud = stats.get((h["series"], p, h.get("cudnn") or ""))
      ms = lambda s: f"{s['slowest_ms']:.3f}" if s else "–"
      ratio = (f"{cud['slowest_ms'] / ours['slowest_ms']:.2f}x" if ours and cud else "–")
      check = ("ok" if ours and ours["all_ok"] and (cud is None or cud["all_ok"])
               else "WRONG" if (ours and not ours["all_ok"]) or (cud and not cud["all_ok"])
               else "missing")
      lines.append(f"{h['series'][:40]:<40} {p:<6} {(h['primary'] or '–')[:14]:<14} {ms(ours):>9} "
                   f"{ms(cud):>9} {ratio:>10}  {check}")
  counts = collections.Counter(r["status"] for r in results["rows"])
  lines.append("rows: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
               + f"; timing: {timing_text(results['settings'])}")
  return lines


def finish(results, out_dir) -> None:
  """Summaries into the JSON, then bench.md and the plots."""
  stats = series_stats(results["rows"])
  best = fastest(stats, results.get("headlines", ()))
  bal = balance(results, stats)
  results["summary"] = {"series": list(stats.values()), "fastest": best}
  results["balance"] = bal
  results["window_fits"] = window_fits(results["rows"], results["settings"]["passes"])
  with open(os.path.join(out_dir, "bench.md"), "w") as f:
    f.write(markdown(results, stats, best, bal))
  results["plots"] = [os.path.basename(p) for p in plots(results, stats, out_dir)]
  write_json(results, out_dir)


def main(argv=None) -> None:
  """Re-renders bench.md and plots from bench.json files (merging split runs)."""
  import argparse  # noqa: PLC0415
  ap = argparse.ArgumentParser(description="bench.json -> bench.md + PNG (several merge)")
  ap.add_argument("json", nargs="+", help="bench.json files of one GPU (rows are concatenated)")
  ap.add_argument("--out", required=True, help="output directory")
  args = ap.parse_args(argv)
  runs = []
  for path in args.json:
    with open(path) as f:
      runs.append(json.load(f))
  merged = dict(runs[0])
  merged["rows"] = [r for run in runs for r in run["rows"]]
  merged["merged_from"] = args.json
  merged["timings_meaningful"] = all(r.get("timings_meaningful") for r in runs)
  devices = {r["environment"]["device"] for r in runs}
  if len(devices) > 1:
    raise SystemExit(f"refusing to merge runs from different devices: {sorted(devices)}")
  os.makedirs(args.out, exist_ok=True)
  finish(merged, args.out)
  print(f"wrote {args.out}/bench.md, bench.json and plots from {len(runs)} run(s)")


if __name__ == "__main__":
  main()
