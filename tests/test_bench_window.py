"""The sliding-window benchmark's CPU smoke mode: every windowed row is checked."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_window, common  # noqa: E402


def test_bench_window_smoke_checks_rows_and_fits(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  backends = ["xla", "triton"]
  res = bench_window.main(["--smoke", "--backends", ",".join(backends), "--out", str(tmp_path)])
  rows = res["rows"]
  assert {r["impl"] for r in rows} == set(backends) | {"xla full"}
  assert all(r["status"] == "ok" for r in rows), [(r["impl"], r.get("reason")) for r in rows]
  for r in rows:
    if r["windowed"]:   # both row slices checked; gradients at the smallest S
      assert len([c for c in r["check"] if c.startswith("out[")]) == 2
      assert all(c["ok"] for c in r["check"].values())
      assert {"dq", "dk", "dv"} <= set(r["check"])
  assert {f"{b} fwd" for b in backends} <= set(res["fits"])
  data = json.loads((tmp_path / "bench_window.json").read_text())
  assert data["timings_meaningful"] is False and data["settings"]["window"] == 16
  assert "Smoke run" in (tmp_path / "bench_window.md").read_text()
  assert (tmp_path / "bench_window.png").stat().st_size > 1000


def test_bench_window_check_catches_a_wrong_window(tmp_path, monkeypatch):
  """A row computed with a different window fails its check (the check can fail)."""
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  real = bench_window._impls

  def wrong(backends, window, with_full, with_cudnn):
    return real(backends, window + 3, with_full, with_cudnn)

  monkeypatch.setattr(bench_window, "_impls", wrong)
  res = bench_window.main(["--smoke", "--backends", "xla", "--no-full", "--passes", "fwd",
                           "--out", str(tmp_path)])
  assert [r["status"] for r in res["rows"]] == ["error", "error"]
  assert "check failed" in res["rows"][0]["reason"]
