"""The context-parallel benchmark's CPU smoke mode and the HLO overlap reader."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_cp, common, hlo_overlap  # noqa: E402


def test_bench_cp_smoke_checks_every_row_and_reads_the_ring_schedule(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  out = tmp_path / "cp"
  res = bench_cp.main(["--smoke", "--out", str(out), "--xla-variants", "default,lhs",
                       "--variant-strategies", "ring", "--dump-hlo", "--passes", "fwdbwd",
                       "--rounds", "1", "--warmup", "0"])
  rows = res["rows"]
  bad = [(r["label"], r["status"], r.get("reason")) for r in rows if r["status"] != "ok"]
  assert not bad, bad
  labels = {r["label"] for r in rows}
  assert {"1 GPU xla", "allgather xla", "ring xla", "ulysses xla", "ring+ulysses xla",
          "1 GPU cudnn", "heads-sharded cudnn", "ring xla [lhs]"} <= labels, labels
  for r in rows:   # every row checked against the oracle; cp rows have an efficiency
    fb = r["passes"]["fwdbwd"]
    assert set(fb["check"]) == {"out", "dq", "dk", "dv"}
    assert all(c["ok"] and c["max_abs_err"] > 0 for c in fb["check"].values())
    if r["kind"] != "single":
      assert fb["efficiency"] > 0
  data = json.loads((out / "bench_cp.json").read_text())
  assert data["environment"]["world"] == 4 and data["timings_meaningful"] is False
  assert "Smoke run" in (out / "bench_cp.md").read_text()
  assert (out / "bench_cp.png").stat().st_size > 1000
  # The ring's loop bodies: no ppermute waits on the step's kernel (the
  # backward sends the previous step's dK, dV), so each could overlap it.
  text = (out / "hlo_ring_xla_default_S64.txt").read_text()
  records = hlo_overlap.analyze(text)
  entry = [r for r in records if r["computation"].startswith("main")]
  loops = [r for r in records if r not in entry]
  assert len(loops) == 6, loops   # forward K, V; backward K, V, dK, dV
  assert all(r["kind"] == "collective-permute" and not r["waits_on_heavy"]
             and r["independent"] for r in loops), loops


def test_bench_cp_smoke_with_a_sliding_window(tmp_path):
  # Every row with local_window_size=(5, 0) (chunks of 8 tokens: the window
  # crosses their borders) agrees with the windowed fp32 oracle.
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  res = bench_cp.main(["--smoke", "--window", "5", "--out", str(tmp_path), "--passes",
                       "fwdbwd", "--rounds", "1", "--warmup", "0"])
  rows = res["rows"]
  bad = [(r["label"], r["status"], r.get("reason")) for r in rows if r["status"] != "ok"]
  assert not bad, bad
  assert res["settings"]["window"] == 5
  assert {"allgather xla", "ring xla", "ulysses xla", "ring+ulysses xla"} <= {
      r["label"] for r in rows}
  for r in rows:
    assert set(r["passes"]["fwdbwd"]["check"]) == {"out", "dq", "dk", "dv"}
  assert "sliding window 5" in (tmp_path / "bench_cp.md").read_text()


def test_hlo_overlap_reads_async_pairs():
  text = """HloModule m, is_scheduled=true

%body (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %cp-start = (f32[8]{0}, f32[8]{0}) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %k = f32[8]{0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton"
  %cp-done = f32[8]{0} collective-permute-done(%cp-start)
  %late-start = (f32[8]{0}, f32[8]{0}) collective-permute-start(%k), \
source_target_pairs={{0,1},{1,0}}
  %late-done = f32[8]{0} collective-permute-done(%late-start)
  ROOT %add = f32[8]{0} add(%cp-done, %late-done)
}
"""
  records = {r["name"]: r for r in hlo_overlap.analyze(text)}
  assert records["cp-start"]["async"] and records["cp-start"]["bracketed"] == ["k"]
  assert records["late-start"]["waits_on_heavy"] and not records["late-start"]["bracketed"]
  summary = hlo_overlap.summarize(list(records.values()))["collective-permute"]
  assert summary == dict(total=2, is_async=2, overlapped=1, could_overlap=1, waits_on_heavy=1)


def test_llama_compare_data_vs_context_parallel_on_cpu(tmp_path):
  # Same global batch and sequence: identical first-step losses, and a table.
  from benchmarks import llama  # noqa: PLC0415
  out = tmp_path / "llama.json"
  res = llama.main(["--preset", "tiny", "--backend", "xla", "--batch", "2", "--seq", "32",
                    "--steps", "1", "--warmup", "1", "--devices", "2",
                    "--compare", "dp,ulysses", "--json-out", str(out)])
  assert [r["mode"] for r in res] == ["dp", "ulysses"]
  assert all("error" not in r and r["devices"] == 2 and r["tokens_per_s_per_device"] > 0
             for r in res), res
  losses = [r["first_loss"] for r in res]
  assert max(losses) - min(losses) < 1e-4, losses
  assert json.loads(out.read_text())["results"][1]["layout"].endswith("strategy=ulysses")


def test_llama_sliding_window_in_every_mode_on_cpu():
  # --window reaches the attention in every layout: the same first-step loss
  # everywhere (the sequence is 4 chunks of 8 tokens: the window of 5 crosses
  # chunk borders), and not the loss without a window.
  losses = _llama_first_losses(["--window", "5"], "single,dp,allgather,ring,ulysses",
                                key="window", value=5)
  full = _llama_first_losses([], "single")[0]
  assert abs(full - losses[0]) > 1e-4, (full, losses)


def _llama_first_losses(extra, compare, key=None, value=None):
  """First-step losses of the tiny Llama (2 devices) in each ``--compare`` layout;
  asserts none failed, ``r[key] == value`` and that all layouts agree."""
  from benchmarks import llama  # noqa: PLC0415
  res = llama.main(["--preset", "tiny", "--backend", "xla", "--batch", "2", "--seq", "32",
                    "--steps", "1", "--warmup", "1", "--devices", "2", *extra,
                    "--compare", compare])
  assert all("error" not in r and (key is None or r[key] == value) for r in res), res
  losses = [r["first_loss"] for r in res]
  assert max(losses) - min(losses) < 1e-4, losses
  return losses


@pytest.mark.gpu
def test_bench_cp_runs_on_every_gpu(tmp_path):
  import jax  # noqa: PLC0415
  if jax.device_count() < 2:
    pytest.skip("needs >= 2 GPUs")
  res = bench_cp.main(["--out", str(tmp_path), "--seqs", "8192", "--heads", "8x4x64",
                       "--backends", "triton", "--rounds", "2", "--warmup", "1", "--sets", "1"])
  bad = [(r["label"], r["status"], r.get("reason")) for r in res["rows"]
         if r["status"] in ("wrong", "error")]
  assert not bad, bad
  assert any(r["kind"] == "cp" and r["status"] == "ok" for r in res["rows"])


def test_bench_cp_check_catches_a_wrong_cp_row(tmp_path, monkeypatch):
  """A cp row computed with another window fails the oracle check (the check can fail)."""
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  real = bench_cp.cp_fn
  monkeypatch.setattr(bench_cp, "cp_fn", lambda *a, window=None, **kw: real(*a, window=3, **kw))
  res = bench_cp.main(["--smoke", "--out", str(tmp_path), "--strategies", "ring",
                       "--no-baselines", "--passes", "fwd", "--rounds", "1", "--warmup", "0"])
  status = {r["label"]: r["status"] for r in res["rows"]}
  assert status == {"1 GPU xla": "ok", "ring xla": "wrong"}, status


@pytest.mark.parametrize("window", [None, 5])
def test_llama_jax_baseline_is_the_same_attention(window):
  # The jax.nn baseline (impls.jax_nn_causal) and this package's attention on
  # the same call agree, with and without a window.
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from benchmarks import llama  # noqa: PLC0415
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = (jax.random.normal(kk, (2, 32, h, 16)) for kk, h in zip(ks, (4, 2, 2)))
  got = llama.baseline_attention_fn("jax-xla", window)(q, k, v)
  want = llama.grouped_attention_fn("xla", "kernel", window=window)(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  other = llama.baseline_attention_fn("jax-xla", None if window else 5)(q, k, v)
  assert float(np.max(np.abs(np.asarray(other) - np.asarray(want)))) > 1e-3


def test_llama_soft_cap_in_every_mode_on_cpu():
  # --softcap reaches the attention in every layout (with a window, as Gemma 2
  # trains): the same first-step loss everywhere, the plain-XLA fallback
  # included, and not the loss without the cap.
  from benchmarks import llama  # noqa: PLC0415
  losses = _llama_first_losses(["--window", "5", "--softcap", "0.5"],
                               "single,dp,ring,ulysses,single@jax-xla", key="softcap", value=0.5)
  plain = _llama_first_losses(["--window", "5"], "single")[0]
  assert abs(plain - losses[0]) > 1e-4, (plain, losses)
  with pytest.raises(ValueError, match="no logit soft"):
    llama.baseline_attention_fn("jax-cudnn", None, 50.0)


def test_llama_sinks_in_every_mode_on_cpu():
  # --sinks (an nnx.Param [heads] per layer) reaches the attention in every
  # layout: the same first-step loss everywhere, the plain-XLA fallback
  # included, and not the loss without sinks; the sinks get a gradient.
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from benchmarks import llama  # noqa: PLC0415
  losses = _llama_first_losses(["--sinks", "--window", "5"],
                               "single,dp,ring,ulysses,single@jax-xla", key="sinks", value=True)
  plain = _llama_first_losses(["--window", "5"], "single")[0]
  assert abs(plain - losses[0]) > 1e-4, (plain, losses)
  with pytest.raises(ValueError, match="no sinks"):
    llama.baseline_attention_fn("jax-cudnn", None, None, sinks=True)
  cfg = llama.dataclasses.replace(llama.PRESETS["tiny"], sinks=True)
  graphdef, params = llama.build(cfg)
  sinks_of = lambda tree: [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
                           if "sinks" in jax.tree_util.keystr(path)]
  sinks = sinks_of(params)
  assert len(sinks) == 1 and sinks[0].shape == (cfg.n_layers, cfg.n_heads), sinks
  tokens, targets = llama.synthetic_batch(jax.random.key(0), 2, 16, cfg.vocab_size)
  _, grads = llama.make_grad_fn(graphdef, llama.grouped_attention_fn("xla", "kernel", sinks=True))(
      params, tokens, targets, jax.numpy.arange(16))
  g = sinks_of(grads)
  assert len(g) == 1 and float(np.max(np.abs(np.asarray(g[0])))) > 0, g
