"""The benchmark's CPU smoke mode and its checking machinery (oracle, lse composition)."""

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax_grouped_attn as ga  # noqa: E402
from benchmarks import bench, common, harness, impls  # noqa: E402


def _reference(wl, q, k, v):
  return ga.grouped_attention(q, k, v, wl.groups, causal=wl.causal, backend="xla",
                              local_window_size=wl.window, logits_soft_cap=wl.softcap,
                              sinks=common.sink_logits(wl))


@pytest.mark.parametrize("wl", [
    common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, batch=2, dtype="float32"),
    common.contiguous_workload(4, 64, 2, hq=2, hk=1, d=32, dtype="float32"),
    common.causal_workload(1, 40, 2, 2, 32, dtype="float32"),
    common.causal_workload(1, 40, 2, 2, 32, dtype="float32", window=(7, 0)),
    dataclasses.replace(common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, dtype="float32"),
                        softcap=0.7),
    # Sinks of the selected q heads only (kv heads 0 and 3 of 4).
    dataclasses.replace(common.causal_workload(2, 40, 8, 4, 32, dtype="float32"), sinks=True),
    # A v head_dim of its own (MLA): out, dv [.., Dv], dq, dk [.., D].
    dataclasses.replace(common.causal_workload(2, 40, 4, 2, 48, dtype="float32"), dv=16),
    dataclasses.replace(common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, dtype="float32"),
                        dv=64),
], ids=lambda wl: wl.name)
def test_oracle_matches_reference_autodiff(wl):
  q, k, v, do = common.make_inputs(wl, 3)
  # A tiny logits budget forces several row chunks plus padding rows.
  max_elems = 8 * wl.tk * wl.hq * wl.batch
  assert common.oracle_chunk(wl, max_elems) < wl.tq
  got = common.oracle(wl, q, k, v, do, max_elems=max_elems)
  (out, lse), vjp = jax.vjp(lambda q, k, v: ga.grouped_attention(
      q, k, v, wl.groups, causal=wl.causal, backend="xla", local_window_size=wl.window,
      logits_soft_cap=wl.softcap, sinks=common.sink_logits(wl), return_lse=True), q, k, v)
  dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
  # Whole tensors: every batch row, head and query row.
  for name, g, w in [("out", got["out"], out), ("lse", got["lse"], lse), ("dq", got["dq"], dq),
                     ("dk", got["dk"], dk), ("dv", got["dv"], dv)]:
    assert g.shape == w.shape, (name, g.shape, w.shape)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=name)


def _mla_formula(q, k, v):
  """Causal softmax(q k^T / sqrt(Dqk)) v, written out (kv heads repeated per group)."""
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, precision="highest") / np.sqrt(q.shape[-1])
  t = q.shape[1]
  s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vr, precision="highest")


def test_oracle_with_its_own_value_head_dim_is_the_formula():
  wl = dataclasses.replace(common.causal_workload(2, 40, 4, 2, 48, dtype="float32"), dv=16)
  q, k, v, do = common.make_inputs(wl, 7)
  assert v.shape == (2, 40, 2, 16) and do.shape == (2, 40, 4, 16) and k.shape[-1] == 48
  got = common.oracle(wl, q, k, v, do, max_elems=8 * wl.tk * wl.hq * wl.batch)
  out, vjp = jax.vjp(_mla_formula, q, k, v)
  dq, dk, dv = vjp(do)
  for name, g, w in [("out", got["out"], out), ("dq", got["dq"], dq),
                     ("dk", got["dk"], dk), ("dv", got["dv"], dv)]:
    assert g.shape == w.shape, (name, g.shape, w.shape)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=name)
  assert got["out"].shape[-1] == got["dv"].shape[-1] == 16 and got["dq"].shape[-1] == 48


def test_flops_count_each_matmul_at_its_own_head_dim():
  base = common.causal_workload(1, 8192, 16, 16, 192)
  mla = dataclasses.replace(base, dv=128)
  per = base.pairs * base.batch * base.hq
  # fwd: QK^T at 192, PV at 128; bwd: QK^T, dQ, dK at 192, dP, dV at 128.
  assert mla.flops("fwd") == 2 * per * (192 + 128)
  assert mla.flops("bwd") == 2 * per * (3 * 192 + 2 * 128)
  assert mla.flops("fwdbwd") == mla.flops("fwd") + mla.flops("bwd")
  for p, factor in [("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)]:   # one head_dim
    assert base.flops(p) == 4 * per * 192 * factor
  assert mla.name == "causal B1 S8192 Hq16 Hk16 D192 Dv128"
  assert common.global_key(mla) != common.global_key(base)   # inputs of their own


def test_low_precision_oracle_is_the_reference_in_bf16():
  # The benchmarks' chunked low-precision oracle and reference.py's
  # compute_dtype path are the same computation: the calibration they give
  # agrees, and it is not the fp32 answer.
  from cases import Case, lowp_grads, lowp_reference
  from jax_grouped_attn.testing import check
  wl = common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, batch=1, dtype="bfloat16")
  q, k, v, do = common.make_inputs(wl, 4)
  got = common.oracle(wl, q, k, v, do, max_elems=8 * wl.tk * wl.hq * wl.batch)
  case = Case("wl", wl.groups, wl.tk, hq=wl.hq, hk=wl.hk, d=wl.d, batch=wl.batch,
              dtype=jnp.bfloat16)
  out, lse = lowp_reference(case, q, k, v, None, None)
  grads = lowp_grads(case, q, k, v, None, None, do, jnp.zeros_like(lse))
  for name, lp in zip(["out", "dq", "dk", "dv"], [out, *grads]):
    c = check(got["lowp"][name], got[name], lp, name=name)
    assert c.ok and c.max_err > 0 and c.lowp_max_err > 0, str(c)
  # S is exact in the input dtype, so the lse is the same in both precisions.
  np.testing.assert_allclose(np.asarray(got["lowp"]["lse"]), np.asarray(lse), rtol=1e-5)


def test_lse_composition_has_exact_forward_and_gradients():
  # The cuDNN composition's merge and custom VJP (merged out/lse handed to
  # every part's backward), with the reference standing in for cuDNN.
  wl = common.zigzag_workload(4, 128, 1, hq=4, hk=2, d=32, dtype="float32")
  q, k, v, do = common.make_inputs(wl, 5)
  fn = impls.composed_attention(wl.groups, True, 1 / math.sqrt(wl.d), impls.ReferenceParts())
  assert [len(s) for _, s in impls.composition_parts(wl.groups, True)] == [2, 2]
  out, vjp = jax.vjp(fn, q, k, v)
  want_out, want_vjp = jax.vjp(lambda q, k, v: _reference(wl, q, k, v), q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5)
  for g, w in zip(jax.jit(vjp)(do), want_vjp(do)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)
  with pytest.raises(ValueError, match="kv_len == q_pos"):
    impls.composition_parts((ga.QueryGroup(0, 8, 0, 16),), True)


def _stub_cudnn_gpu_checks(monkeypatch):
  """jax's cuDNN rules check the GPU and cuDNN version: stubbed so they lower on CPU."""
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  for name, stub in [("check_cudnn_version", lambda: 91000),
                     ("check_compute_capability", lambda c: True),
                     ("is_cuda_compute_capability_equal", lambda c: False)]:
    if not hasattr(fa, name):
      pytest.skip(f"jax internals moved ({name}); the GPU test covers the fallback")
    monkeypatch.setattr(fa, name, stub)


def test_cudnn_composition_traces_and_lowers_for_cuda(monkeypatch):
  # CPU check of the plumbing into jax's cuDNN rules (GPU-only checks stubbed):
  # 4 forward and 4 backward cuDNN calls, each backward fed the merged lse/out.
  _stub_cudnn_gpu_checks(monkeypatch)
  wl = common.zigzag_workload(4, 1024, 1, hq=8, hk=2, d=64)
  built = impls.Cudnn().build(wl, impls.Context(gpu=True))
  assert "exact merged backward" in built.note, built.note
  q, k, v, do = common.make_inputs(wl, 0)
  f = lambda q, k, v, do: jax.vjp(built.fn, q, k, v)[1](do)
  jaxpr = jax.make_jaxpr(f)(q, k, v, do).jaxpr
  producer = {id(o): e for e in jaxpr.eqns for o in e.outvars}
  fwd = [e for e in jaxpr.eqns if "dot_product_attention_fwd" in e.primitive.name]
  bwd = [e for e in jaxpr.eqns if "dot_product_attention_bwd" in e.primitive.name]
  assert len(fwd) == 4 and len(bwd) == 4
  fwd_outs = {id(o) for e in fwd for o in e.outvars}
  for e in bwd:   # residual lse/out are the merged ones, not a part's own
    lse_in = [x for x in e.invars if getattr(x, "aval", None) is not None
              and x.aval.shape == (1, 8, 128) and x.aval.dtype == jnp.float32]
    assert lse_in and all(id(x) not in fwd_outs for x in lse_in)
    assert all(producer.get(id(x)) is not None for x in lse_in)
  text = jax.jit(f).trace(q, k, v, do).lower(lowering_platforms=("cuda",)).as_text()
  assert "fmhaSoftmaxBackward" in text or "cudnn" in text


def test_smoke_mode_writes_reports_with_small_errors(tmp_path, monkeypatch):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  oracles = []
  real_oracle = common.oracle

  def counted(wl, *a, **kw):
    oracles.append(wl.name)
    return real_oracle(wl, *a, **kw)

  monkeypatch.setattr(common, "oracle", counted)
  out = tmp_path / "bench"
  res = bench.main(["--smoke", "--out", str(out), "--shape", "1x32x2x2x32", "--zigzag", "2x64",
                    "--backends", "pallas_triton,xla,cudnn,jax-pallas-mha,two-launch",
                    "--rounds", "1", "--warmup", "0"])
  data = json.loads((out / "bench.json").read_text())
  md = (out / "bench.md").read_text()
  assert data["mode"] == "smoke" and data["timings_meaningful"] is False
  assert "timings here mean nothing" in md and "## Load balance" in md
  assert data["environment"]["jax"] == jax.__version__
  rows = data["rows"]
  ran = [r for r in rows if r["status"] not in ("skipped",)]
  assert ran and not [r for r in rows if r["status"] in ("error", "wrong")], \
      [(r["workload"], r["impl"], r["pass"], r.get("reason")) for r in rows
       if r["status"] in ("error", "wrong")]
  impls_ran = {r["impl"] for r in ran}
  assert {"pallas_triton", "xla", "pallas_triton-2launch", "jax-pallas-mha"} <= impls_ran
  # cuDNN is skipped with a printed reason; every checked error is small.
  assert all("GPU" in r["reason"] for r in rows if r["impl"] == "cudnn")
  checked = 0
  for r in ran:
    for name, c in (r.get("check") or {}).items():
      # The calibrated check (jax_grouped_attn/testing.py) against the oracle.
      assert c["ok"] and c["ratio"] <= 1.0 and c["max_abs_err"] < 5e-2, (
          r["workload"], r["impl"], name, c)
      checked += 1
  assert checked >= 8, checked
  assert {r["pass"] for r in ran} == {"fwd", "bwd", "fwdbwd"}
  assert data["balance"] and data["summary"]["fastest"]
  # One oracle per workload, shared by every implementation (and the
  # contiguous ranks of the balance rows have their own).
  assert sorted(oracles) == sorted(set(oracles)), oracles
  assert set(oracles) == {r["workload"] for r in ran}
  # Where the time went: every run's first row has its phases; the shared
  # inputs and oracle are paid by one run per workload, the others find them cached.
  firsts = [r for r in rows if "run_s" in (r.get("phases") or {})]
  assert len(firsts) == len({(r["workload"], r["impl"]) for r in ran})
  for r in firsts:
    ph = r["phases"]
    assert {"build_s", "inputs_s", "oracle_s", "compile_s", "check_s", "time_s"} <= set(ph), ph
    assert ph["run_s"] >= ph["compile_s"] + ph["check_s"] + ph["time_s"] > 0
  payers = [r["workload"] for r in firsts if r["phases"]["oracle_s"] > 0]
  assert sorted(payers) == sorted(set(oracles))
  assert all("compile_s" in r["phases"] for r in ran if r["pass"] == "fwdbwd")
  assert "## Where the time went" in md
  # matplotlib is in the bench extra: the plots must be there.
  pytest.importorskip("matplotlib", reason="the [bench] extra installs matplotlib")
  assert res["plots"], "no plots written"
  for png in res["plots"]:
    assert (out / png).stat().st_size > 1000


def test_sinks_rows_are_checked_and_a_row_without_them_is_wrong(tmp_path, monkeypatch):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  argv = ["--smoke", "--out", str(tmp_path), "--shape", "1x32x4x2x32", "--sinks",
          "--workloads", "causal", "--backends", "pallas_triton,jax-pallas-mha", "--rounds", "1",
          "--warmup", "0"]

  def statuses():
    rows = bench.main(argv)["rows"]
    return {(r["workload"], r["impl"], r["pass"]): (r["status"], r.get("reason"))
            for r in rows}

  got = statuses()
  sunk = {k: v for k, v in got.items() if k[0].endswith(" sinks")}
  assert {v[0] for k, v in sunk.items() if k[1] == "pallas_triton"} == {"ok"}, sunk
  assert all("no sinks" in v[1] for k, v in sunk.items() if k[1] == "jax-pallas-mha"), sunk
  real = impls.ga.grouped_attention
  monkeypatch.setattr(impls.ga, "grouped_attention",
                      lambda *a, sinks=None, **kw: real(*a, **kw))   # sinks dropped
  got = statuses()
  wrong = {v[0] for k, v in got.items() if k[0].endswith(" sinks") and k[1] == "pallas_triton"}
  assert wrong == {"wrong"}, got


def test_mla_rows_are_checked_with_their_padded_v_workarounds(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  kernels = [b.name for b in impls.registry.kernel_entries() if b.interpretable]
  res = bench.main(["--smoke", "--out", str(tmp_path), "--shape", "1x32x4x2x48", "--dv", "16",
                    "--workloads", "causal", "--backends", ",".join(kernels + ["xla", "cudnn",
                                                                              "padv"]),
                    "--passes", "fwd,fwdbwd", "--rounds", "1", "--warmup", "0"])
  rows = res["rows"]
  mla = "custom B1 S32 Hq4 Hk2 D48 Dv16"
  status = {(r["workload"], r["impl"], r["pass"]): r["status"] for r in rows}
  ours = kernels + ["xla"] + [f"{n}+padv" for n in kernels]
  assert {status[(mla, n, p)] for n in ours for p in ("fwd", "fwdbwd")} == {"ok"}, status
  # Their checks are the oracle's real shapes: out and dv at Dv, dq and dk at D.
  for r in rows:
    if r["workload"] == mla and r["status"] == "ok":
      assert r["dv"] == 16 and set(r["check"]) == ({"out", "lse"} if r["pass"] == "fwd"
                                                   else {"dq", "dk", "dv"}), r
      assert all(c["ok"] for c in r["check"].values()), r
  assert all("GPU" in r["reason"] for r in rows if r["impl"] in ("cudnn", "cudnn+padv"))
  # The workarounds are offered only where v has a head_dim of its own.
  assert not [r for r in rows if r["workload"] != mla and r["impl"].endswith("+padv")]
  assert {r["dv"] for r in rows if r["workload"] != mla} == {None}


def _measure_padv(monkeypatch, pad_v):
  """fwd and fwdbwd rows of the xla backend's padded-v workaround (``pad_v``
  standing in for impls.pad_v) on a tiny MLA workload: {pass: row}."""
  monkeypatch.setattr(impls, "pad_v", pad_v)
  wl = dataclasses.replace(common.causal_workload(1, 32, 4, 2, 48, dtype="float32"), dv=16)
  st = harness.Settings(("fwd", "fwdbwd"), 1, 0, 1, impls.Context(gpu=False))
  rows = harness.measure([(wl, "xla+padv")], st,
                         registry_={"xla+padv": impls.PadV(impls.Grouped("xla"))})
  return {r["pass"]: r for r in rows}


def test_a_wrong_padded_v_row_is_caught(monkeypatch):
  real = impls.pad_v
  rows = _measure_padv(monkeypatch, real)
  assert rows["fwd"]["status"] == rows["fwdbwd"]["status"] == "ok", rows
  pad = lambda d, dv: ((0, 0), (0, 0), (0, 0), (0, d - dv))
  # The padding not sliced off: out [.., D] against the oracle's [.., Dv].
  unsliced = lambda fn, d, dv: lambda q, k, v: fn(q, k, jnp.pad(v, pad(d, dv)))
  rows = _measure_padv(monkeypatch, unsliced)
  assert rows["fwd"]["status"] == "wrong" and "shapes" in rows["fwd"]["check"]["out"]["why"]
  assert rows["fwdbwd"]["status"] != "ok", rows["fwdbwd"]
  # Sliced at the wrong end: the right shapes, padded (zero) columns.
  misplaced = lambda fn, d, dv: lambda q, k, v: fn(q, k, jnp.pad(v, pad(d, dv)))[..., d - dv:]
  rows = _measure_padv(monkeypatch, misplaced)
  assert rows["fwd"]["status"] == rows["fwdbwd"]["status"] == "wrong", rows
  assert not any(c["ok"] for c in rows["fwdbwd"]["check"].values()), rows["fwdbwd"]["check"]


def test_cudnn_says_why_it_cannot_take_dv_and_its_padded_v_row_traces(monkeypatch):
  wl = dataclasses.replace(common.causal_workload(1, 256, 4, 2, 192), dv=128)
  gpu = impls.Context(gpu=True)
  assert "cudnn+padv" in impls.Cudnn().unavailable(wl, gpu)
  padv = impls.all_impls()["cudnn+padv"]
  assert padv.unavailable(wl, gpu) is None
  assert "nothing to pad" in padv.unavailable(dataclasses.replace(wl, dv=None), gpu)
  assert "> q/k's" in padv.unavailable(dataclasses.replace(wl, dv=256), gpu)
  _stub_cudnn_gpu_checks(monkeypatch)
  built = padv.build(wl, gpu)
  assert "v zero-padded to D192" in built.note
  q, k, v, do = common.make_inputs(wl, 0)
  assert jax.eval_shape(built.fn, q, k, v).shape == (1, 256, 4, 128)
  grads = lambda q, k, v, do: jax.vjp(built.fn, q, k, v)[1](do)
  assert [g.shape for g in jax.eval_shape(grads, q, k, v, do)] == [q.shape, k.shape, v.shape]
  text = jax.jit(grads).trace(q, k, v, do).lower(lowering_platforms=("cuda",)).as_text()
  assert "cudnn" in text


@pytest.mark.gpu
def test_cudnn_composition_matches_oracle_on_gpu():
  # The composition calls jax's cuDNN custom_vjp rules directly: check that
  # this jax still has them (note) and that forward and merged backward are exact.
  wl = common.zigzag_workload(4, 2048, 1, hq=8, hk=2, d=64)
  built = impls.Cudnn().build(wl, impls.Context(gpu=True))
  assert "exact merged backward" in built.note, built.note
  q, k, v, do = common.make_inputs(wl, 0)
  want = common.oracle(wl, q, k, v, do)
  out, vjp = jax.vjp(jax.jit(built.fn), q, k, v)
  dq, dk, dv = jax.jit(vjp)(do)
  # The factor the benchmark checks this baseline with (it rounds twice).
  res = common.compare(out, want, "out", built.tolerance_factor)
  assert res["ok"], ("out", res)
  for name, got in [("dq", dq), ("dk", dk), ("dv", dv)]:
    res = common.compare(got, want, name, built.tolerance_factor)
    assert res["ok"], (name, res)


@pytest.mark.gpu
def test_bench_baselines_run_on_gpu(tmp_path):
  res = bench.main(["--out", str(tmp_path), "--shape", "1x1024x4x4x64", "--zigzag", "2x2048",
                    "--backends", "cudnn,jax-pallas-mha", "--rounds", "2", "--warmup", "1",
                    "--sets", "1"])
  rows = res["rows"]
  bad = [(r["workload"], r["impl"], r["pass"], r.get("reason")) for r in rows
         if r["status"] in ("error", "wrong")]
  assert not bad, bad
  ok = {(r["impl"], r["family"]) for r in rows if r["status"] == "ok"}
  assert {("cudnn", "custom"), ("cudnn", "zigzag"), ("jax-pallas-mha", "custom")} <= ok
  assert (tmp_path / "bench.md").exists()


# ------------------------------------------------------------ run order ---

def _gpu_plan(argv):
  """The plan a GPU with every implementation would run (built on the CPU)."""
  return bench.build_plan(bench.parse_args(argv), "quick", usable=lambda name: True)


HEADLINE_SERIES = ["causal B1 S8192 Hq32 Hk8 D128", "causal B4 S4096 Hq16 Hk16 D64",
                   "causal B1 S8192 Hq16 Hk16 D256", "zigzag W8 S65536 B1 Hq32 Hk8 D128"]


def test_quick_plan_pairs_ours_with_cudnn_per_headline_workload():
  plan = _gpu_plan(["--quick"])
  primary = [n for n in bench.report.GROUPED][0]
  # Headline workloads first, in order, each: our primary kernel, then cuDNN (one unit).
  head = [(it.series, it.impl) for it in plan[:2 * len(HEADLINE_SERIES)]]
  assert head == [(s, i) for s in HEADLINE_SERIES for i in (primary, "cudnn")], head
  for a, b in zip(plan[0:8:2], plan[1:8:2]):
    assert a.unit == b.unit and a.tier == b.tier == 0
  assert len({it.unit for it in plan[:8]}) == 4
  assert [len(it.wls) for it in plan[:8]] == [1, 1, 1, 1, 1, 1, 8, 8]
  # Every headline comparison comes before any baseline row.
  baseline = [i for i, it in enumerate(plan)
              if it.impl.endswith("-2launch") or it.impl in ("xla", "jax-pallas-mha")]
  assert baseline and min(baseline) > 8
  assert all(plan[i].tier == 3 for i in baseline if not plan[i].balance)
  # Our other kernels on the headline workloads come right after the headline pairs.
  assert {it.impl for it in plan[8:16]} == set(bench.report.GROUPED[1:])
  assert all(it.headline for it in plan[8:16])
  # --quick still has S8192 MHA and the load-balance rows, after the headline part.
  series = [it.series for it in plan]
  assert "causal B1 S8192 Hq32 Hk32 D128" in series[16:]
  assert any(it.balance and it.series.startswith("contiguous W8") for it in plan[16:])


def test_full_plan_puts_the_headline_workloads_first():
  plan = bench.build_plan(bench.parse_args([]), "full", usable=lambda name: True)
  assert [it.series for it in plan[:8:2]] == HEADLINE_SERIES
  assert [it.impl for it in plan[1:8:2]] == ["cudnn"] * 4
  # The other workloads keep their own ours + cuDNN pairs, each one unit.
  for i, it in enumerate(plan):
    if it.impl == "cudnn" and not it.balance:
      assert plan[i - 1].series == it.series and plan[i - 1].unit == it.unit, (i, it.series)


def test_dv_plan_pairs_ours_and_cudnn_with_their_padded_v_rows():
  args = ["--shape", "1x8192x16x16x192", "--dv", "128", "--workloads", "causal",
          "--backends", "pallas_mosaic,cudnn,padv", "--passes", "fwd,fwdbwd"]
  plan = _gpu_plan(args)
  base, mla = "custom B1 S8192 Hq16 Hk16 D192", "custom B1 S8192 Hq16 Hk16 D192 Dv128"
  assert [(it.series, it.impl) for it in plan] == [
      (base, "pallas_mosaic"), (base, "cudnn"), (mla, "pallas_mosaic"),
      (mla, "pallas_mosaic+padv"), (mla, "cudnn"), (mla, "cudnn+padv")]
  assert len({it.unit for it in plan[:2]}) == len({it.unit for it in plan[2:]}) == 1
  assert all(it.tier == 0 for it in plan)
  assert plan[2].wls[0].dv == 128 and plan[0].wls[0].dv is None
  # A shape whose D is DV has no twin: it would be the same call.
  plan = _gpu_plan(args[:3] + ["192"] + args[4:])
  assert {it.series for it in plan} == {base}
  with pytest.raises(SystemExit):
    bench.parse_args(["--dv", "0"])


def test_primary_kernel_is_the_first_usable_one():
  # Without Mosaic (no Hopper), Triton pairs with cuDNN; on CPU, what runs here.
  plan = bench.build_plan(bench.parse_args(["--quick"]), "quick",
                          usable=lambda name: name != "pallas_mosaic")
  assert [it.impl for it in plan[:2]] == ["triton", "cudnn"]
  plan = bench.build_plan(bench.parse_args(["--backends", "pallas_triton,cudnn"]), "quick",
                          usable=lambda name: True)
  assert [it.impl for it in plan] == ["pallas_triton", "cudnn"] * 4 + [
      "pallas_triton", "cudnn", "pallas_triton", "cudnn"]


class _FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class _FakeRunner(harness.Runner):
  """Every rank takes ``per_run`` seconds of a fake clock and comes out ok."""

  def __init__(self, plan_args, budget_s, per_run):
    self.clock = _FakeClock()
    args = bench.parse_args(plan_args)
    st = harness.Settings(args.passes, 1, 0, 1, impls.Context(gpu=True))
    super().__init__(impls.all_impls(), st, common.Budget(budget_s, clock=self.clock))
    self.per_run = per_run
    self.ran = []

  def runnable(self, item, wl):
    return True

  def run_one(self, item, wl):
    self.clock.t += self.per_run
    self.record(item, wl, self.per_run)
    self.ran.append(item)
    return [harness.blank_row(wl, self.registry[item.impl], p, status="ok", median_ms=1.0)
            for p in self.st.passes]


@pytest.mark.parametrize("budget_s", [25.0, 35.0, 55.0, 95.0, 150.0, 250.0])
def test_budget_cut_leaves_only_complete_headline_comparisons(budget_s):
  plan = _gpu_plan(["--quick"])
  runner = _FakeRunner(["--quick"], budget_s, per_run=10.0)
  rows = runner.run(plan)
  assert len(rows) == sum(len(it.wls) for it in plan) * 3   # every rank has its rows
  ran = {(r["series"], r["impl"]): 0 for r in rows}
  for r in rows:
    if r["pass"] == "fwd" and r["status"] == "ok":
      ran[(r["series"], r["impl"])] += 1
  primary = plan[0].impl
  complete = 0
  for it in plan[:8]:
    if it.impl != "cudnn":
      continue
    ours, cud = ran[(it.series, primary)], ran[(it.series, "cudnn")]
    # Either the whole comparison (every rank of both) ran, or none of it.
    assert (ours, cud) in ((0, 0), (len(it.wls), len(it.wls))), (budget_s, it.series, ours, cud)
    complete += ours > 0
  assert complete >= 1
  # Nothing starts after the budget is spent; a started unit may finish.
  assert runner.clock.t <= budget_s + 16 * 10.0
  skipped = [r for r in rows if r["status"] == "skipped"]
  assert all("time budget" in r["reason"] for r in skipped)
  # Causal pairs take 20 s each (the first starts on its a-priori estimate); a
  # headline pair may end within the overrun allowance (1.25x the budget). The
  # zigzag pair (16 runs, 160 s) fits only the largest budget, else it is
  # skipped whole, and then nothing of a later tier runs in its place.
  assert complete == (4 if 1.25 * budget_s >= 220 else
                      max(1, min(3, int(1.25 * budget_s // 20))))
  if complete < 4:
    assert all(it.tier == 0 for it in runner.ran), [(it.series, it.impl) for it in runner.ran]
    later = [r for r in rows if r["series"] not in HEADLINE_SERIES or r["impl"] not in
             (primary, "cudnn")]
    assert later and all("did not fit" in r["reason"] or "spent" in r["reason"] for r in later)


def test_a_budget_that_fits_only_the_headlines_runs_only_the_headlines():
  plan = _gpu_plan(["--quick"])
  runner = _FakeRunner(["--quick"], 221.0, per_run=10.0)   # the headlines take 220 s
  rows = runner.run(plan)
  primary = plan[0].impl
  assert [(it.series, it.impl) for it in runner.ran] == [
      (s, i) for s in HEADLINE_SERIES for i in (primary, "cudnn") for _ in
      range(8 if s.startswith("zigzag") else 1)]
  ok = {(r["series"], r["impl"]) for r in rows if r["status"] == "ok"}
  assert ok == {(s, i) for s in HEADLINE_SERIES for i in (primary, "cudnn")}
  # The rest says why it did not run.
  assert all("time budget" in r["reason"] for r in rows if r["status"] == "skipped")


def test_headline_estimates_are_stated_before_anything_runs():
  plan = _gpu_plan(["--quick"])
  runner = _FakeRunner(["--quick"], 100.0, per_run=10.0)
  est = dict(runner.headline_estimates(plan))
  assert len(est) == 4 and not runner.ran
  zz = next(v for k, v in est.items() if k.startswith("zigzag"))
  one = next(v for k, v in est.items() if k.startswith(HEADLINE_SERIES[0]))
  # 8 ranks of ours and of cuDNN, and each rank's oracle (compiled once: the
  # ranks differ only in their groups).
  wl = plan[6].wls[0]
  prior, oracle = harness.prior_seconds, harness.prior_oracle_seconds
  ours, cudnn = runner.registry[plan[6].impl], runner.registry["cudnn"]
  assert zz == pytest.approx(8 * (prior(ours, wl, False) + prior(cudnn, wl, False)
                                  + oracle(wl, False)) + harness.PRIOR_ORACLE_S[0])
  assert 0 < one < zz
  # Runs so far scale the estimates, per kind: ours took 3x its prior, the
  # oracle half of its own; cuDNN, not run yet, by all runs together.
  first = plan[0]
  wl0 = first.wls[0]
  p0, o0 = prior(ours, wl0, False), oracle(wl0, True)
  runner.record(first, wl0, 3 * p0 + 0.5 * o0, oracle_s=0.5 * o0)
  est2 = dict(runner.headline_estimates(plan))
  later = next(k for k in est if k.startswith(HEADLINE_SERIES[1]))
  wl1 = plan[2].wls[0]
  overall = (3 * p0 + 0.5 * o0) / (p0 + o0)
  assert est2[later] == pytest.approx(3 * prior(ours, wl1, False) + 0.5 * oracle(wl1, True)
                                      + overall * prior(cudnn, wl1, False))


def test_budget_overrun_cuts_a_unit_that_was_misjudged():
  # The zigzag pair's a-priori estimate fits a 150 s budget, but its 16 runs
  # take 25 s each: the unit stops past 1.25 x 150 s instead of running 400 s.
  plan = [it for it in _gpu_plan(["--quick"]) if it.series == HEADLINE_SERIES[3]]
  runner = _FakeRunner(["--quick"], 150.0, per_run=25.0)
  rows = runner.run(plan)
  fwd_ok = [r for r in rows if r["pass"] == "fwd" and r["status"] == "ok"]
  assert len(fwd_ok) == 8 and runner.clock.t == 200.0
  assert any("overrun" in r.get("reason", "") for r in rows)


class _FakeDevice:
  """A GPU queue on a fake clock: each call queues ``device_ms`` of work; a sync
  waits for the queue and costs ``latency_ms`` of launch and sync latency."""

  def __init__(self, device_ms, latency_ms):
    self.t = 0.0
    self.device_ms, self.latency_ms = device_ms, latency_ms
    self.queued = 0
    self.args = []

  def clock(self):
    return self.t

  def fn(self, *args):
    self.queued += 1
    self.args.append(args)
    return len(self.args)

  def sync(self, _):
    self.t += (self.queued * self.device_ms + self.latency_ms) * 1e-3
    self.queued = 0


@pytest.mark.parametrize("device_ms", [0.05, 1.0, 31.0])
def test_time_calls_reports_device_time_per_call(device_ms):
  dev = _FakeDevice(device_ms, latency_ms=0.25)
  sets = [("a",), ("b",), ("c",)]
  t = common.time_calls(dev.fn, sets, rounds=5, warmup=2, clock=dev.clock, sync=dev.sync)
  # A round lasts ~25 ms (at least 2 calls), so one sync adds ~1% at most.
  want = min(common.MAX_CALLS, max(2, math.ceil(25 / (device_ms + 0.25))))
  assert t["calls"] in (want, min(want + 1, common.MAX_CALLS))   # (fp rounding of the clock)
  assert t["median_ms"] == pytest.approx(device_ms + 0.25 / t["calls"])
  if device_ms >= 1.0:
    assert t["median_ms"] <= 1.02 * device_ms
  assert t["method"] == "back-to-back" and t["rounds"] == 5 and t["spread"] < 1e-9
  # Input sets rotate from call to call.
  assert [a[0] for a in dev.args[:7]] == ["a", "b", "c", "a", "b", "c", "a"]
  # One call per sync (the old per-call timer) reads the latency into every call.
  one = common.time_calls(dev.fn, sets, rounds=5, warmup=0, calls=1, clock=dev.clock,
                          sync=dev.sync)
  assert one["median_ms"] == pytest.approx(device_ms + 0.25)


def test_time_calls_median_and_spread_over_rounds():
  dev = _FakeDevice(1.0, latency_ms=0.0)
  per_round = iter([2.0, 1.0, 1.2, 0.9, 1.0, 1.1])   # the first, untimed round is slow
  real_sync = dev.sync

  def sync(x):
    if dev.queued == 4:   # a timed round: this round's device time per call
      dev.device_ms = next(per_round)
    real_sync(x)

  t = common.time_calls(dev.fn, [()], rounds=5, warmup=0, calls=4, clock=dev.clock, sync=sync)
  assert t["median_ms"] == pytest.approx(1.0)
  assert t["min_ms"] == pytest.approx(0.9) and t["max_ms"] == pytest.approx(1.2)
  assert len(t["round_ms"]) == 5
  assert t["spread"] == pytest.approx(0.3)


def test_main_warns_when_a_gpu_is_visible_but_unused(monkeypatch):
  calls = []
  monkeypatch.setattr(bench.ga_platform, "warn_if_gpu_unused", lambda: calls.append(1),
                      raising=False)
  bench._warn_if_gpu_unused()
  assert calls == [1]
  # A jax_grouped_attn without the check: nothing to call, no error.
  monkeypatch.delattr(bench.ga_platform, "warn_if_gpu_unused")
  bench._warn_if_gpu_unused()
  assert calls == [1]


def test_gate_never_times_while_compiling():
  import threading
  gate = harness.Gate()
  log, started = [], threading.Event()

  def compile_job(name, hold):
    with gate.compile():
      log.append(f"{name} start")
      started.set()
      time.sleep(hold)
      log.append(f"{name} end")

  t = threading.Thread(target=compile_job, args=("c1", 0.3))
  t.start()
  started.wait()
  with gate.time():   # waits for c1; c2, asked for meanwhile, waits for the timing
    log.append("time start")
    t2 = threading.Thread(target=compile_job, args=("c2", 0.0))
    t2.start()
    time.sleep(0.2)
    log.append("time end")
  t.join()
  t2.join()
  assert log == ["c1 start", "c1 end", "time start", "time end", "c2 start", "c2 end"], log


def test_compiles_ahead_on_threads_give_the_same_checked_rows(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  args = ["--smoke", "--shape", "1x32x4x2x32", "--zigzag", "2x64", "--workloads", "causal,zigzag",
          "--backends", "pallas_triton,xla", "--passes", "fwd,fwdbwd", "--rounds", "1"]
  rows = {}
  for threads in ("0", "2"):
    res = bench.main(args + ["--out", str(tmp_path / threads), "--compile-threads", threads])
    rows[threads] = {(r["workload"], r["impl"], r["pass"]): (r["status"], sorted(r.get("check")
                     or {})) for r in res["rows"]}
    firsts = [r for r in res["rows"] if "run_s" in (r.get("phases") or {})]
    assert firsts and all(("compile_wait_s" in r["phases"]) == (threads != "0") for r in firsts)
  assert rows["0"] == rows["2"]
  assert {v[0] for v in rows["2"].values()} == {"ok"}, rows["2"]


def test_fastest_table_names_no_winner_where_a_headline_pair_is_missing():
  from benchmarks import report
  def row(series, impl, pass_, ms, status="ok", family="causal"):
    return {"series": series, "workload": series, "impl": impl, "pass": pass_, "median_ms": ms,
            "status": status, "family": family, "world": 0, "rank": 0, "seq": 0, "tk": 8192,
            "flops": 1e12}
  a, b = "causal B1 S8192 Hq32 Hk8 D128", "zigzag W8 S65536 B1 Hq32 Hk8 D128"
  rows = [row(a, "pallas_mosaic", "fwd", 1.0), row(a, "cudnn", "fwd", 1.1),
          row(b, "triton", "fwd", 30.0, family="zigzag")]   # b: only a baseline ran
  heads = [{"series": a, "primary": "pallas_mosaic", "cudnn": "cudnn"},
           {"series": b, "primary": "pallas_mosaic", "cudnn": "cudnn"}]
  best = {x["series"]: x for x in report.fastest(report.series_stats(rows), heads)}
  assert best[a]["fastest"] == "pallas_mosaic" and best[a]["cudnn_ratio"] == pytest.approx(1.1)
  assert best[b]["fastest"] is None and best[b]["incomplete"] == ["pallas_mosaic", "cudnn"]
  # A wrong primary row is missing too.
  rows[0]["status"] = "wrong"
  best = {x["series"]: x for x in report.fastest(report.series_stats(rows), heads)}
  assert best[a]["fastest"] is None and best[a]["incomplete"] == ["pallas_mosaic"]
  md = report.markdown({"environment": {"device": "x", "jax": "", "jaxlib": "", "triton": "",
                                        "jax_triton": "", "cudnn": "", "time": ""},
                        "mode": "quick", "timings_meaningful": True, "rows": rows,
                        "settings": {"rounds": 5, "calls": None, "passes": ["fwd"]}},
                       report.series_stats(rows), list(best.values()), [])
  assert "incomplete: no pallas_mosaic, cudnn" in md and "incomplete: no pallas_mosaic |" in md


class _LastHeadOff(impls.Impl):
  """The reference with the last query head's q scaled by 1.05, in the last
  batch row only: wrong somewhere no sample of the first heads or rows sees."""

  name = "last-head-off"
  kind = "grouped"

  def build(self, wl, ctx):
    inner = impls.Grouped("xla").build(wl, ctx).fn

    def fn(q, k, v):
      scale = jnp.ones((q.shape[0], q.shape[2]), q.dtype).at[-1, -1].set(1.05)[:, None, :, None]
      return inner(q * scale, k, v)
    return impls.Built(fn, "test")


def test_a_wrong_head_is_caught_anywhere():
  wl = common.causal_workload(2, 32, 4, 2, 32, dtype="float32")
  st = harness.Settings(("fwd", "fwdbwd"), 1, 0, 1, impls.Context(gpu=False), calls=1)
  rows = {r["pass"]: r for r in harness.measure([(wl, "last-head-off")], st,
                                                 registry_={"last-head-off": _LastHeadOff()})}
  assert rows["fwd"]["status"] == rows["fwdbwd"]["status"] == "wrong", rows
  # Whole tensors: the worst element is in the last batch row and query head
  # (dk, dv: its kv head).
  assert rows["fwd"]["check"]["out"]["worst"][0] == 1
  assert rows["fwd"]["check"]["out"]["worst"][2] == 3
  assert not rows["fwdbwd"]["check"]["dq"]["ok"] and rows["fwdbwd"]["check"]["dq"]["worst"][2] == 3
  assert not rows["fwdbwd"]["check"]["dk"]["ok"] and rows["fwdbwd"]["check"]["dk"]["worst"][2] == 1


def test_a_compile_that_failed_on_a_thread_is_compiled_again_inline(monkeypatch):
  import concurrent.futures
  wl = common.causal_workload(1, 32, 2, 2, 32, dtype="float32")
  st = harness.Settings(("fwd", "fwdbwd"), 1, 0, 1, impls.Context(gpu=False), calls=1)
  impl = impls.Grouped("xla")
  bad = harness.Compiled()
  bad.built = impl.build(wl, st.ctx)
  bad.exes = {"fwd": RuntimeError("not thread-safe"), "fwdbwd": RuntimeError("not thread-safe")}
  fut = concurrent.futures.Future()
  fut.set_result(bad)
  store = harness.Inputs(1)
  store.reserve(wl)
  rows = harness.run_item(harness.WorkloadState(wl, store), impl, st, compiled=fut)
  assert [r["status"] for r in rows] == ["ok", "ok"], rows
  assert rows[0]["phases"]["compiled_again"] == 1.0
  # A refusal (NotImplementedError) is not compiled again: it is the answer.
  bad.exes = {"fwd": NotImplementedError("no"), "fwdbwd": NotImplementedError("no")}
  assert not bad.failed
