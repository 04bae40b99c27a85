"""One markdown results page from the bench.json files of ``python -m benchmarks.bench``.

  python -m benchmarks.results_page RUN.json [RUN.json ...] --out benchmarks/RESULTS.md
  python -m benchmarks.results_page RUN.json ... --out benchmarks/RESULTS.md --readme README.md

Per run: a section naming the GPU, date, versions, mode and timing method, then
one table per pass (fwd, fwdbwd) of every workload: each implementation's ms
and TF/s, cuDNN ms / ours ms, and the max relative errors of ours beside
cuDNN's. Zigzag series report their slowest rank. ``--readme`` also rewrites
the summary table between the README's markers from the FIRST run given.

Pure functions (``load`` -> ``series_results`` / ``summary`` -> markdown), so
the tests build a run dict and check the text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

from benchmarks.report import rel_err  # the one reading of a check entry

# Our kernels in the registry's preference order ("pallas": its name in older runs);
# a run without headlines or plan takes the first of these that has rows.
OURS = ("pallas_mosaic", "triton", "pallas_triton", "pallas")
CUDNN = "cudnn"
PASSES = ("fwd", "fwdbwd")
TENSORS = ("out", "lse", "dq", "dk", "dv")
BEGIN = "<!-- results-summary:begin -->"
END = "<!-- results-summary:end -->"
BACK_TO_BACK = "back-to-back"
PER_CALL = "per-call"
METHOD_TEXT = {
    BACK_TO_BACK: "back-to-back (rounds of calls, one device sync per round; ms = round / calls)",
    PER_CALL: "per-call (each call synced on its own: ~0.2-0.3 ms of launch and sync latency "
              "in every call, so ~1 ms kernels read ~20% low in TF/s and ratios are "
              "compressed toward 1)",
}
# Worst first: a series' status over its ranks is the worst of theirs.
_STATUS_ORDER = ("wrong", "error", "ok", "skipped")


def load(path: str) -> dict:
  """The bench.json at ``path``."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def timing_method(run: dict) -> str:
  """The run's timing: "back-to-back", "per-call" (rows without ``method``) or "mixed".

  Only timed passes count: bwd rows are fwdbwd - fwd, with no method of their own.
  """
  methods = {r.get("method", PER_CALL) for r in run.get("rows", ())
             if r.get("median_ms") is not None and r.get("pass") in PASSES}
  if len(methods) > 1:
    return "mixed"
  return methods.pop() if methods else PER_CALL


def _worst(statuses) -> str:
  statuses = set(statuses) or {"skipped"}
  return min(statuses, key=lambda s: _STATUS_ORDER.index(s) if s in _STATUS_ORDER else 0)


def _merge_ranks(rows: list[dict]) -> dict:
  """One (series, impl, pass) over its ranks: slowest timed rank, worst status, max errors."""
  by_rank = {}
  for r in rows:   # merged runs may hold a rank twice: a timed row beats a skipped one
    old = by_rank.get(r.get("rank", 0))
    if old is None or (old.get("median_ms") is None and r.get("median_ms") is not None):
      by_rank[r.get("rank", 0)] = r
  ranks = list(by_rank.values())
  timed = [r for r in ranks if r.get("median_ms") is not None]
  slow = max(timed, key=lambda r: r["median_ms"]) if timed else None
  errs = {}
  for t in TENSORS:
    vals = [e for e in (rel_err(r.get("check", {}).get(t)) for r in ranks) if e is not None]
    if vals:
      errs[t] = max(vals)
  world = max(rows[0].get("world") or 1, 1)
  reasons = sorted({r.get("reason") or r.get("error") or "" for r in ranks} - {""})
  return {"status": _worst(r.get("status", "ok") for r in ranks),
          "ms": slow["median_ms"] if slow else None,
          "tflops": slow.get("tflops") if slow else None,
          "spread": slow.get("spread") if slow else None,
          "ranks_timed": len(timed), "world": world, "errs": errs, "reasons": reasons}


def series_results(run: dict) -> dict:
  """{series: {"family", "world", pass: {impl: merged result}}}, in row order."""
  groups = {}
  for r in run.get("rows", ()):
    if r.get("pass") in PASSES:
      key = (r.get("series") or r.get("workload", "?"), r["pass"], r.get("impl", "?"))
      groups.setdefault(key, []).append(r)
  out = {}
  for (series, pas, impl), rows in groups.items():
    s = out.setdefault(series, {"family": rows[0].get("family"),
                                "world": rows[0].get("world") or 0})
    s.setdefault(pas, {})[impl] = _merge_ranks(rows)
  return out


def _has_rows(results: dict, series: str, impl: str) -> bool:
  return any(results[series].get(p, {}).get(impl, {}).get("ms") is not None for p in PASSES)


def primary_impl(run: dict, results: dict | None = None) -> str | None:
  """Our primary kernel: the run's own word (headlines, plan), else the first of OURS timed."""
  for h in run.get("headlines") or ():
    if h.get("primary"):
      return h["primary"]
  for item in run.get("plan") or ():
    if item.get("tier", "").startswith("headline: ours") and item.get("impl") != CUDNN:
      return item["impl"]
  results = series_results(run) if results is None else results
  for name in OURS:
    if any(_has_rows(results, s, name) for s in results):
      return name
  return None


def headlines(run: dict, results: dict | None = None) -> list[dict]:
  """[{"series", "primary", "cudnn", "complete"}]: the run's ``headlines``, else the
  first tier of its plan, else every series with both ours and cuDNN timed."""
  results = series_results(run) if results is None else results
  if run.get("headlines"):
    return [dict(h) for h in run["headlines"]]
  primary = primary_impl(run, results)
  heads = {}
  for item in run.get("plan") or ():
    if item.get("tier", "").startswith("headline: ours"):
      heads.setdefault(item["series"], {"series": item["series"], "primary": primary,
                                         "cudnn": CUDNN, "complete": True})
  if not heads:
    heads = {s: {"series": s, "primary": primary, "cudnn": CUDNN, "complete": True}
             for s in results if _has_rows(results, s, primary) and _has_rows(results, s, CUDNN)}
  return list(heads.values())


def ratio(cudnn_ms: float | None, ours_ms: float | None) -> float | None:
  """cuDNN ms / ours ms (> 1: ours faster)."""
  if not cudnn_ms or not ours_ms:
    return None
  return cudnn_ms / ours_ms


def _ok_ms(res: dict | None) -> float | None:
  return res["ms"] if res and res["status"] == "ok" else None


def summary(run: dict) -> list[dict]:
  """Per headline series: ours and cuDNN fwd+bwd ms, their ratio and the fwd ratio."""
  results = series_results(run)
  out = []
  for h in headlines(run, results):
    s = results.get(h["series"], {})
    ours = {p: s.get(p, {}).get(h["primary"]) for p in PASSES}
    cud = {p: s.get(p, {}).get(h["cudnn"]) for p in PASSES}
    out.append({
        "series": h["series"], "primary": h["primary"], "cudnn": h["cudnn"],
        "complete": h.get("complete", True), "world": s.get("world", 0),
        "ours_ms": (ours["fwdbwd"] or {}).get("ms"), "cudnn_ms": (cud["fwdbwd"] or {}).get("ms"),
        "ours_status": (ours["fwdbwd"] or {}).get("status", "missing"),
        "cudnn_status": (cud["fwdbwd"] or {}).get("status", "missing"),
        "ratio": ratio(_ok_ms(cud["fwdbwd"]), _ok_ms(ours["fwdbwd"])),
        "fwd_ratio": ratio(_ok_ms(cud["fwd"]), _ok_ms(ours["fwd"])),
    })
  return out


def _ms(x) -> str:
  if x is None:
    return "–"
  return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _x(r) -> str:
  return "–" if r is None else f"{r:.2f}x"


def _e(x) -> str:
  return "–" if x is None else f"{x:.1e}"


def _mark(status: str) -> str:
  """What a cell says about a result that is not ok ("" when ok)."""
  return {"ok": "", "wrong": " **WRONG**", "error": " **ERROR**",
          "skipped": " skipped", "missing": " not run"}.get(status, f" **{status}**")


def _cell(res: dict | None) -> str:
  if res is None:
    return "–"
  if res["ms"] is None:
    return _mark(res["status"]).strip() or "–"
  text = _ms(res["ms"])
  if res.get("tflops"):
    text += f" ({res['tflops']:.0f})" if res["tflops"] >= 10 else f" ({res['tflops']:.2g})"
  if res.get("spread") is not None:
    text += f" ±{100 * res['spread']:.0f}%"
  if res["world"] > 1 and res["ranks_timed"] < res["world"]:
    text += f" [{res['ranks_timed']}/{res['world']} ranks]"
  return text + _mark(res["status"])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _date(env: dict) -> str:
  return (env.get("time") or "date unknown").split(" ")[0]


def _cudnn_version(v) -> str:
  if isinstance(v, int):   # cudnnGetVersion(): 91900 is 9.19.0
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
  return str(v) if v else "?"


def _command(mode) -> str:
  """The bench command line of a run's ``mode``."""
  flag = {"quick": " --quick", "full": "", "smoke": " --smoke"}.get(mode, f" ({mode} mode)")
  return f"python -m benchmarks.bench{flag}"


def _series_label(name: str, world: int) -> str:
  return f"{name}, slowest of {world} ranks" if world > 1 else name


def _impl_columns(results: dict, pas: str, primary: str | None) -> list[str]:
  """Implementations with a result other than skipped in ``pas``: ours, cuDNN, the rest."""
  seen = []
  for s in results.values():
    for impl, res in s.get(pas, {}).items():
      if res["status"] != "skipped" and impl not in seen:
        seen.append(impl)
  first = [n for n in (primary, CUDNN) if n in seen]
  rest = sorted((n for n in seen if n not in first),
                key=lambda n: (OURS.index(n) if n in OURS else len(OURS), seen.index(n)))
  return first + rest


def pass_table(results: dict, pas: str, primary: str | None,
               heads: dict | None = None) -> list[str]:
  """Markdown lines: one row per series of pass ``pas`` (ms (TF/s), ratio, errors)."""
  impls = _impl_columns(results, pas, primary)
  tensors = [t for t in TENSORS if any(
      t in res["errs"] for s in results.values() for res in s.get(pas, {}).values())]
  header = (["workload"] + [f"{n} ms (TF/s)" for n in impls] + ["cuDNN / ours"]
            + [f"{t} err ours / cuDNN" for t in tensors])
  rows = []
  for name, s in results.items():
    res = s.get(pas)
    if not res or all(r["status"] == "skipped" for r in res.values()):
      continue
    h = (heads or {}).get(name, {})
    ours, cud = res.get(h.get("primary", primary)), res.get(h.get("cudnn", CUDNN))
    rows.append([_series_label(name, s["world"])] + [_cell(res.get(n)) for n in impls]
                + [_x(ratio(_ok_ms(cud), _ok_ms(ours)))]
                + [f"{_e((ours or {}).get('errs', {}).get(t))} / "
                   f"{_e((cud or {}).get('errs', {}).get(t))}" for t in tensors])
  return _table(header, rows) if rows else ["(no rows)"]


def _not_run(results: dict, pas: str) -> list[str]:
  """One line naming the implementations skipped on every series, with why."""
  skipped = {}
  for s in results.values():
    for impl, res in s.get(pas, {}).items():
      if res["status"] != "skipped":
        skipped[impl] = None
      elif skipped.setdefault(impl, set()) is not None:
        skipped[impl].update(res["reasons"])
  whole = {i: r for i, r in skipped.items() if r is not None}
  if not whole:
    return []
  # Reasons without their numbers ("time budget (340 s) spent"), to their first
  # sentence: one per kind.
  short = lambda r: sorted({re.split(r"(?<=\.)\s", re.sub(r"\s*\([^)]*\)", "", x))[0]
                            for x in r})
  parts = [f"`{i}`" + (f" ({'; '.join(short(r))})" if r else "") for i, r in whole.items()]
  return ["", "Skipped on every workload: " + ", ".join(parts) + "."]


def run_section(run: dict, source: str) -> str:
  """The markdown section of one run."""
  env = run.get("environment", {})
  results = series_results(run)
  primary = primary_impl(run, results)
  heads = {h["series"]: h for h in headlines(run, results)}
  method = timing_method(run)
  lines = [f"## {env.get('device', 'unknown device')}, {_date(env)}", "",
           f"Source: `{source}`; {env.get('time', '')}. jax {env.get('jax', '?')}, "
           f"jaxlib {env.get('jaxlib', '?')}, cuDNN {_cudnn_version(env.get('cudnn'))}, "
           f"triton {env.get('triton', '?')}, jax-triton {env.get('jax_triton', '?')}; "
           f"`{_command(run.get('mode'))}`; ours = `{primary}`.", "",
           f"Timing: **{METHOD_TEXT.get(method, method)}**."]
  if run.get("timings_meaningful") is False:
    lines += ["", "**No GPU: these timings mean nothing** (interpret mode; a correctness run)."]
  for pas in PASSES:
    lines += ["", f"### {pas}", ""] + pass_table(results, pas, primary, heads)
    lines += _not_run(results, pas)
  return "\n".join(lines) + "\n"


def _summary_ms(ms, status) -> str:
  return f"{_ms(ms)} ms{_mark(status)}" if ms is not None else _mark(status).strip()


def summary_markdown(run: dict, source: str) -> str:
  """The README's summary (what goes between BEGIN and END) from one run."""
  env = run.get("environment", {})
  method = timing_method(run)
  rows = []
  for s in summary(run):
    label = _series_label(s["series"], s["world"])
    if not s["complete"]:
      label += " (incomplete)"
    composed = " (composition)" if s["world"] > 1 else ""
    rows.append([label, _summary_ms(s["ours_ms"], s["ours_status"]),
                 _summary_ms(s["cudnn_ms"], s["cudnn_status"]) + composed,
                 _x(s["ratio"]), _x(s["fwd_ratio"])])
  primary = primary_impl(run)
  timing = {BACK_TO_BACK: "back-to-back timings",
            PER_CALL: "**per-call timings** (each call synced on its own, so ~1 ms kernels "
                      "read slow and ratios are compressed toward 1)"}.get(method, method)
  dtypes = "/".join(sorted({r["dtype"] for r in run.get("rows", ()) if r.get("dtype")}))
  head = (f"{env.get('device', 'unknown device')}, {_date(env)}, {dtypes or 'dtype?'}, "
          f"`{_command(run.get('mode'))}` (`{source}`), {timing}. "
          f"Ours = `{primary}`; ratios are cuDNN ms / ours ms (> 1: ours faster).")
  table = _table(["workload", "ours fwd+bwd", "cuDNN fwd+bwd", "cuDNN / ours fwd+bwd",
                  "cuDNN / ours fwd"], rows)
  head = textwrap.fill(head, 95, break_long_words=False, break_on_hyphens=False)
  return "\n".join([head, ""] + table) + "\n"


def page(runs: list[tuple[str, dict]]) -> str:
  """The whole results page: an introduction, then one section per (source, run)."""
  intro = [
      "# Benchmark results", "",
      "Generated by `python -m benchmarks.results_page` from the `bench.json` files of "
      "`python -m benchmarks.bench`; do not edit by hand. Every row was checked against an "
      "exact fp32 oracle before it was timed (`benchmarks/README.md`, \"Method\").", "",
      "- Cells: median ms, (TF/s), ±spread ((max - min) / median over rounds, where recorded); "
      "zigzag series give their slowest rank (`[k/W ranks]` when not every rank ran). "
      "**WRONG** marks a result outside its error tolerance, **ERROR** one that failed to "
      "compile or run; *skipped*: not run (time budget, or the shape is not supported).",
      "- cuDNN / ours: cuDNN's ms over our primary kernel's, both ok (> 1: ours faster); for "
      "zigzag series cuDNN is the composition of cuDNN calls merged by log-sum-exp.",
      "- Errors: each tensor's max error relative to its scale (max |reference|), over the "
      "elements the run checked (older runs: the first and last batch row and kv head, with "
      "all their query heads); zigzag series take their worst rank.",
      "- `pallas` in older runs is the Pallas kernel lowered through Triton (today's "
      "`pallas_triton`).",
      "- Timing: runs labelled *per-call* are older: each call was synced on its own, which "
      "adds ~0.2-0.3 ms of launch and sync latency per call, so ~1 ms kernels read ~20% low "
      "in TF/s and cuDNN / ours ratios are compressed toward 1. *Back-to-back* runs time "
      "rounds of calls with one sync per round.",
  ]
  return "\n".join(intro) + "\n\n" + "\n".join(run_section(r, src) for src, r in runs)


def replace_summary(text: str, summary_md: str) -> str:
  """``text`` with what lies between BEGIN and END replaced by ``summary_md``."""
  start, end = text.find(BEGIN), text.find(END)
  if start < 0 or end < start:
    raise ValueError(f"README has no {BEGIN} ... {END} pair")
  start += len(BEGIN)
  return text[:start] + "\n" + summary_md.rstrip("\n") + "\n" + text[end:]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", metavar="RUN.json", help="bench.json files, in page order")
  p.add_argument("--out", required=True, help="the markdown page to write")
  p.add_argument("--readme", help="also rewrite this README's summary from the first run")
  args = p.parse_args(argv)
  # Paths as the page names them: relative to here when inside it (the repository root).
  name = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
  runs = [(name(path), load(path)) for path in args.runs]
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(page(runs))
  print(f"wrote {args.out}")
  if args.readme:
    with open(args.readme, encoding="utf-8") as f:
      text = f.read()
    with open(args.readme, "w", encoding="utf-8") as f:
      f.write(replace_summary(text, summary_markdown(runs[0][1], runs[0][0])))
    print(f"rewrote the summary in {args.readme}")


if __name__ == "__main__":
  sys.exit(main())
