"""benchmarks/results_page.py: the tables, ratios, marks and README rewrite it renders."""

import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_page as rp  # noqa: E402

CAUSAL = "causal B1 S8192 Hq32 Hk8 D128"
ZIGZAG = "zigzag W2 S16384 B1 Hq32 Hk8 D128"
ERRS = {"fwd": ("out", "lse"), "fwdbwd": ("dq", "dk", "dv")}


def _row(rnd, series, family, world, rank, impl, pas, method):
  ms = rnd.uniform(0.5, 40.0)
  row = {"workload": f"{series} r{rank}", "series": series, "family": family, "world": world,
         "rank": rank, "batch": 1, "tq": 8192, "tk": 8192 * max(world, 1), "hq": 32, "hk": 8,
         "d": 128, "dv": 128, "dtype": "bfloat16", "impl": impl, "kind": "grouped", "pass": pas,
         "status": "ok", "median_ms": ms, "tflops": rnd.uniform(100.0, 600.0), "rounds": 10,
         "check": {t: {"max_err": rnd.uniform(1e-3, 9e-3), "mean_err": 1e-5, "ok": True}
                   for t in ERRS[pas]}}
  if method:
    row.update(method=method, spread=rnd.uniform(0.0, 0.1), calls=8)
  return row


def synthetic_run(method="back-to-back", seed=0):
  """A bench.json dict: a causal and a 2-rank zigzag series, ours and cuDNN, fwd and fwdbwd."""
  rnd = random.Random(seed)
  rows = [_row(rnd, series, family, world, rank, impl, pas, method)
          for series, family, world in ((CAUSAL, "causal", 0), (ZIGZAG, "zigzag", 2))
          for impl in ("pallas_mosaic", "cudnn") for pas in ("fwd", "fwdbwd")
          for rank in range(max(world, 1))]
  # bwd rows (fwdbwd - fwd) carry no method of their own; the page shows no bwd table.
  rows += [{k: v for k, v in dict(r, **{"pass": "bwd", "median_ms": 0.7 * r["median_ms"]}).items()
            if k not in ("method", "spread", "check")} for r in rows if r["pass"] == "fwdbwd"]
  rows.append(dict(rows[0], impl="xla", status="skipped", median_ms=None, tflops=None,
                   check={}, reason="time budget (100 s) spent"))
  return {"environment": {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2",
                          "jaxlib": "0.11.2", "triton": "3.6.0", "jax_triton": "0.3.1",
                          "cudnn": 91900, "time": "2026-12-09 10:00:00 UTC"},
          "mode": "quick", "timings_meaningful": True, "settings": {},
          "headlines": [{"series": s, "primary": "pallas_mosaic", "cudnn": "cudnn",
                         "complete": True} for s in (CAUSAL, ZIGZAG)],
          "rows": rows}


def _slowest(run, series, impl, pas):
  return max((r for r in run["rows"]
              if (r["series"], r["impl"], r["pass"]) == (series, impl, pas)),
             key=lambda r: r["median_ms"])


def _table(md, pas):
  """{workload label: {column: cell}} of the ``### pas`` table in ``md``."""
  lines = md.split(f"### {pas}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  header = cells(lines[0])
  return {c[0]: dict(zip(header, c)) for c in map(cells, lines[2:])}


def _label(series):
  return f"{series}, slowest of 2 ranks" if series == ZIGZAG else series


@pytest.mark.parametrize("pas", ["fwd", "fwdbwd"])
def test_tables_hold_the_slowest_rank_ratios_and_errors(pas):
  run = synthetic_run()
  table = _table(rp.run_section(run, "bench.json"), pas)
  assert set(table) == {_label(CAUSAL), _label(ZIGZAG)}
  for series in (CAUSAL, ZIGZAG):
    ours, cud = (_slowest(run, series, impl, pas) for impl in ("pallas_mosaic", "cudnn"))
    row = table[_label(series)]
    assert row["cuDNN / ours"] == f"{cud['median_ms'] / ours['median_ms']:.2f}x"
    want = f"{ours['median_ms']:.3f}" if ours["median_ms"] < 10 else f"{ours['median_ms']:.2f}"
    assert row["pallas_mosaic ms (TF/s)"].startswith(f"{want} ({ours['tflops']:.0f}) ±")
    for t in ERRS[pas]:   # the worst rank's error, ours beside cuDNN's
      worst = lambda impl: max(r["check"][t]["max_err"] for r in run["rows"]
                               if (r["series"], r["impl"], r["pass"]) == (series, impl, pas))
      assert row[f"{t} err ours / cuDNN"] == f"{worst('pallas_mosaic'):.1e} / {worst('cudnn'):.1e}"
  assert "xla" not in " ".join(next(iter(table.values())))   # skipped everywhere: no column
  assert "`xla` (time budget spent)" in rp.run_section(run, "bench.json")


def test_summary_values():
  run = synthetic_run()
  summary = {s["series"]: s for s in rp.summary(run)}
  assert list(summary) == [CAUSAL, ZIGZAG]
  for series, s in summary.items():
    ours, cud = (_slowest(run, series, impl, "fwdbwd") for impl in ("pallas_mosaic", "cudnn"))
    fo, fc = (_slowest(run, series, impl, "fwd") for impl in ("pallas_mosaic", "cudnn"))
    assert s["ours_ms"] == ours["median_ms"] and s["cudnn_ms"] == cud["median_ms"]
    assert s["ratio"] == pytest.approx(cud["median_ms"] / ours["median_ms"])
    assert s["fwd_ratio"] == pytest.approx(fc["median_ms"] / fo["median_ms"])
  md = rp.summary_markdown(run, "r.json")
  line = next(x for x in md.splitlines() if x.startswith(f"| {_label(ZIGZAG)} |"))
  assert f"| {summary[ZIGZAG]['ratio']:.2f}x | {summary[ZIGZAG]['fwd_ratio']:.2f}x |" in line
  assert "NVIDIA H100 80GB HBM3, 2026-12-09, bfloat16" in md and "--quick" in md


def test_a_wrong_row_is_marked_and_gets_no_ratio():
  run = synthetic_run()
  bad = next(r for r in run["rows"]
             if (r["series"], r["impl"], r["pass"]) == (CAUSAL, "pallas_mosaic", "fwdbwd"))
  bad["status"] = "wrong"
  md = rp.run_section(run, "bench.json")
  row = _table(md, "fwdbwd")[CAUSAL]
  assert row["pallas_mosaic ms (TF/s)"].endswith("**WRONG**")
  assert row["cuDNN / ours"] == "–"
  assert md.count("WRONG") == 1   # that cell only
  assert "WRONG" not in str(_table(md, "fwd"))
  s = next(s for s in rp.summary(run) if s["series"] == CAUSAL)
  assert s["ours_status"] == "wrong" and s["ratio"] is None and s["fwd_ratio"] is not None
  assert "**WRONG**" in rp.summary_markdown(run, "r.json")


def test_a_zigzag_rank_that_is_wrong_marks_its_series():
  run = synthetic_run()
  fast = min((r for r in run["rows"] if (r["series"], r["impl"], r["pass"])
              == (ZIGZAG, "cudnn", "fwd")), key=lambda r: r["median_ms"])
  fast["status"] = "wrong"   # not the slowest rank: the series is still wrong
  assert _table(rp.run_section(run, "b.json"), "fwd")[_label(ZIGZAG)][
      "cudnn ms (TF/s)"].endswith("**WRONG**")


def test_timing_method_is_labelled():
  old = synthetic_run(method=None)   # older files: no "method", each call synced on its own
  assert rp.timing_method(old) == "per-call"
  assert "Timing: **per-call (each call synced on its own" in rp.run_section(old, "b.json")
  assert "**per-call timings**" in rp.summary_markdown(old, "b.json")
  new = synthetic_run()
  assert rp.timing_method(new) == "back-to-back"
  assert "Timing: **back-to-back" in rp.run_section(new, "b.json")
  assert "per-call" not in rp.summary_markdown(new, "b.json")
  assert "### bwd" not in rp.run_section(new, "b.json")
  new["rows"][0].pop("method")
  assert rp.timing_method(new) == "mixed"


def test_old_checks_give_relative_errors_from_absolute_ones():
  assert rp.rel_err({"max_abs_err": 0.006, "ref_max_abs": 2.0}) == pytest.approx(0.003)
  assert rp.rel_err({"max_err": 0.004, "max_abs_err": 9.0, "ref_max_abs": 1.0}) == 0.004
  assert rp.rel_err({"ok": True}) is None


def test_readme_rewrite_replaces_only_between_the_markers():
  before = "# Title\n\nintro text\n\n" + rp.BEGIN + "\nold table\n| a |\n"
  after = rp.END + "\n\n## Next\n\nmore text\n"
  new = rp.replace_summary(before + after, "NEW SUMMARY\n| b |\n")
  assert new == "# Title\n\nintro text\n\n" + rp.BEGIN + "\nNEW SUMMARY\n| b |\n" + after
  assert rp.replace_summary(new, "NEW SUMMARY\n| b |\n") == new   # idempotent
  with pytest.raises(ValueError):
    rp.replace_summary("# no markers\n", "x")


def test_main_writes_the_page_and_the_readme(tmp_path):
  runs = []
  for name, method in (("new.json", "back-to-back"), ("old.json", None)):
    path = tmp_path / name
    path.write_text(json.dumps(synthetic_run(method=method, seed=len(runs))))
    runs.append(str(path))
  readme = tmp_path / "README.md"
  readme.write_text(f"top\n{rp.BEGIN}\nstale\n{rp.END}\nbottom\n")
  out = tmp_path / "RESULTS.md"
  rp.main([*runs, "--out", str(out), "--readme", str(readme)])
  page = out.read_text()
  assert page.count("## NVIDIA H100 80GB HBM3") == 2
  assert page.index("Timing: **back-to-back") < page.index("Timing: **per-call")
  text = readme.read_text()
  assert text.startswith(f"top\n{rp.BEGIN}\n") and text.endswith(f"{rp.END}\nbottom\n")
  assert "stale" not in text and "back-to-back" in text and "per-call" not in text   # 1st run
