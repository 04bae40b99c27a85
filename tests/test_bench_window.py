"""The sliding-window family of the benchmark (``bench --workloads window``):
CPU smoke runs check every row, fit time = a + b * S and plot it."""

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench, common, impls, report  # noqa: E402

SMOKE = ["--smoke", "--workloads", "window", "--rounds", "1", "--warmup", "0"]


def test_window_family_smoke_checks_rows_and_fits(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  res = bench.main(SMOKE + ["--backends", "xla,triton", "--passes", "fwd,fwdbwd",
                            "--out", str(tmp_path)])
  rows = res["rows"]
  # Per S: the windowed rows and the unwindowed contrast of our primary kernel.
  assert {report.window_label(r) for r in rows} == {"xla", "triton", "triton full"}
  assert sorted({r["tk"] for r in rows}) == [64, 128]
  assert all(r["status"] == "ok" for r in rows), [(r["impl"], r.get("reason")) for r in rows]
  for r in rows:   # every row checked against the oracle, gradients included
    want = {"out", "lse"} if r["pass"] == "fwd" else {"dq", "dk", "dv"}
    assert set(r["check"]) == want and all(c["ok"] for c in r["check"].values()), r
    assert r["family"] == "window" and (r["hq"], r["hk"], r["d"]) == (4, 2, 32)
    assert (r["window"] == [16, 0]) == (report.window_label(r) != "triton full")
  fits = res["window_fits"]
  assert {f"{b} {p}" for b in ("xla", "triton", "triton full") for p in ("fwd", "fwdbwd")} \
      == set(fits)
  assert all(f["points"] == 2 and f["r2"] == pytest.approx(1.0) for f in fits.values())
  data = json.loads((tmp_path / "bench.json").read_text())
  assert data["timings_meaningful"] is False and data["settings"]["window"] == 16
  assert data["settings"]["window_seqs"] == [64, 128] and len(data["rows"]) == len(rows)
  assert set(data["window_fits"]) == set(fits)
  md = (tmp_path / "bench.md").read_text()
  assert "timings here mean nothing" in md and "## Sliding window: time vs S" in md
  assert "Linear fit time = a + b·S" in md and "| 128 |" in md
  pytest.importorskip("matplotlib", reason="the [bench] extra installs matplotlib")
  assert "bench_window.png" in res["plots"]
  assert (tmp_path / "bench_window.png").stat().st_size > 1000


def test_window_check_catches_a_wrong_window(tmp_path, monkeypatch):
  """A row computed with a different window fails its check (the check can fail)."""
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  real = impls.Grouped.build

  def wrong(self, wl, ctx):
    return real(self, dataclasses.replace(wl, window=(wl.window[0] + 3, 0)), ctx)

  monkeypatch.setattr(impls.Grouped, "build", wrong)
  res = bench.main(SMOKE + ["--backends", "xla", "--passes", "fwd", "--out", str(tmp_path)])
  assert [(r["tk"], r["status"]) for r in res["rows"]] == [(64, "wrong"), (128, "wrong")]
  assert res["window_fits"] == {}
  md = (tmp_path / "bench.md").read_text()
  assert "- **WRONG** S64 xla fwd" in md and "**WRONG**" in md.split("## Sliding window")[1]


def test_linear_fit():
  a, b, r2 = report.linear_fit([1024, 2048, 4096], [0.5 + 0.25 * s for s in (1024, 2048, 4096)])
  assert (a, b, r2) == (pytest.approx(0.5), pytest.approx(0.25), pytest.approx(1.0))
  assert report.linear_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])[2] == pytest.approx(0.64)
  assert report.linear_fit([1024], [1.0]) is None
  # Windowed: 0.1 ms + 1 ms per 1K tokens; the contrast: quadratic, no line.
  rows = [{"family": "window", "impl": "triton", "window": [16, 0] if w else None, "tk": s,
           "pass": "fwd", "status": "ok", "median_ms": 0.1 + s / 1024 if w else (s / 1024) ** 2}
          for s in (1024, 2048, 4096) for w in (True, False)]
  fits = report.window_fits(rows, ["fwd"])
  assert fits["triton fwd"]["ms_per_1k_tokens"] == pytest.approx(1.0)
  assert fits["triton fwd"]["intercept_ms"] == pytest.approx(0.1)
  assert fits["triton full fwd"]["r2"] < 0.999


def test_window_plan_pairs_ours_with_cudnn_per_s():
  """Opt-in, non-headline: per S ours + cuDNN with the window (one unit), then
  the contrast of our primary kernel without it."""
  assert "window" not in bench.parse_args([]).workloads
  args = bench.parse_args(["--workloads", "window", "--backends", "pallas_mosaic,triton,cudnn",
                           "--window", "512", "--window-seqs", "8192,16384"])
  plan = bench.build_plan(args, "full", usable=lambda name: True)
  head = "window B1 S8192 Hq32 Hk8 D128"
  assert [(it.series, it.impl) for it in plan[:4]] == [
      (f"{head} window (512, 0)", "pallas_mosaic"), (f"{head} window (512, 0)", "cudnn"),
      (f"{head} window (512, 0)", "triton"), (head, "pallas_mosaic")]
  assert plan[0].unit == plan[1].unit != plan[2].unit
  assert len(plan) == 8 and all(it.tier == 2 and not it.headline for it in plan)
  assert plan[0].wls[0].window == (512, 0) and plan[3].wls[0].window is None
  assert bench.window_params(bench.parse_args(["--workloads", "window"]), "full") == (
      1024, [8192, 16384, 32768, 65536])


@pytest.mark.parametrize("argv", [["--backends", "mosaic"], ["--window", "64"],
                                  ["--workloads", "window", "--window", "-1"],
                                  ["--workloads", "window", "--window-seqs", "0,64"],
                                  ["--workloads", "window", "--window-seqs", "8K"]])
def test_window_flags_are_checked(argv, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(argv)
