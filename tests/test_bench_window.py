"""The sliding-window benchmark's CPU smoke mode: every windowed row is checked."""

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_window, common, impls  # noqa: E402


def test_bench_window_smoke_checks_rows_and_fits(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  backends = ["xla", "triton"]
  res = bench_window.main(["--smoke", "--backends", ",".join(backends), "--out", str(tmp_path)])
  rows = res["rows"]
  assert {bench_window.label(r) for r in rows} == set(backends) | {"xla full"}
  assert all(r["status"] == "ok" for r in rows), [(r["impl"], r.get("reason")) for r in rows]
  for r in rows:   # every row checked against the oracle, gradients included
    want = {"out"} if r["pass"] == "fwd" else {"dq", "dk", "dv"}
    assert set(r["check"]) == want and all(c["ok"] for c in r["check"].values())
    assert (r["window"] == [16, 0]) == (bench_window.label(r) != "xla full")
  assert {f"{b} fwd" for b in backends} <= set(res["fits"])
  data = json.loads((tmp_path / "bench_window.json").read_text())
  assert data["timings_meaningful"] is False and data["settings"]["window"] == 16
  assert len(data["rows"]) == len(rows)
  assert "Smoke run" in (tmp_path / "bench_window.md").read_text()
  assert (tmp_path / "bench_window.png").stat().st_size > 1000


def test_bench_window_check_catches_a_wrong_window(tmp_path, monkeypatch):
  """A row computed with a different window fails its check (the check can fail)."""
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  real = impls.Grouped.build

  def wrong(self, wl, ctx):
    return real(self, dataclasses.replace(wl, window=(wl.window[0] + 3, 0)), ctx)

  monkeypatch.setattr(impls.Grouped, "build", wrong)
  res = bench_window.main(["--smoke", "--backends", "xla", "--no-full", "--passes", "fwd",
                           "--out", str(tmp_path)])
  assert [r["status"] for r in res["rows"]] == ["wrong", "wrong"]
  assert "WRONG" in (tmp_path / "bench_window.md").read_text()


def test_bench_window_rejects_an_unknown_backend(tmp_path):
  with pytest.raises(SystemExit):
    bench_window.parse_args(["--backends", "mosaic", "--out", str(tmp_path)])
