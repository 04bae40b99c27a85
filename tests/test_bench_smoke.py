"""The benchmark's CPU smoke mode and its checking machinery (oracle, lse composition)."""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax_grouped_attn as ga  # noqa: E402
from benchmarks import bench, common, impls  # noqa: E402


def _reference(wl, q, k, v):
  return ga.grouped_attention(q, k, v, wl.groups, causal=wl.causal, backend="xla")


@pytest.mark.parametrize("wl", [
    common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, batch=2, dtype="float32"),
    common.contiguous_workload(4, 64, 2, hq=2, hk=1, d=32, dtype="float32"),
    common.causal_workload(1, 40, 2, 2, 32, dtype="float32"),
], ids=lambda wl: wl.name)
def test_oracle_matches_reference_autodiff(wl):
  q, k, v, do = common.make_inputs(wl, 3)
  sel = common.selection(wl)
  # A tiny logits budget forces several row chunks plus padding rows.
  got = common.oracle(wl, q, k, v, do, sel, max_elems=8 * wl.tk * len(sel.q_heads))
  out, vjp = jax.vjp(lambda q, k, v: _reference(wl, q, k, v), q, k, v)
  dq, dk, dv = vjp(do)
  for name, g, w in [("out", got["out"], sel.q(out)), ("dq", got["dq"], sel.q(dq)),
                     ("dk", got["dk"], sel.kv(dk)), ("dv", got["dv"], sel.kv(dv))]:
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=name)


def test_low_precision_oracle_is_the_reference_in_bf16():
  # The benchmarks' chunked low-precision oracle and reference.py's
  # compute_dtype path are the same computation: the calibration they give
  # agrees, and it is not the fp32 answer.
  from cases import Case, lowp_grads, lowp_reference
  from tolerance import check
  wl = common.zigzag_workload(2, 96, 1, hq=4, hk=2, d=32, batch=1, dtype="bfloat16")
  q, k, v, do = common.make_inputs(wl, 4)
  sel = common.selection(wl)
  got = common.oracle(wl, q, k, v, do, sel, max_elems=8 * wl.tk * len(sel.q_heads))
  case = Case("wl", wl.groups, wl.tk, hq=wl.hq, hk=wl.hk, d=wl.d, batch=wl.batch,
              dtype=jnp.bfloat16)
  out, lse = lowp_reference(case, q, k, v, None, None)
  grads = lowp_grads(case, q, k, v, None, None, do, jnp.zeros_like(lse))
  for name, lp in zip(["out", "dq", "dk", "dv"], [out, *grads]):
    lp = sel.q(lp) if name in ("out", "dq") else sel.kv(lp)
    c = check(got["lowp"][name], got[name], lp, name=name)
    assert c.ok and c.max_err > 0 and c.lowp_max_err > 0, str(c)


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


def test_cudnn_composition_traces_and_lowers_for_cuda(monkeypatch):
  # CPU check of the plumbing into jax's cuDNN rules (GPU-only checks stubbed):
  # 4 forward and 4 backward cuDNN calls, each backward fed the merged lse/out.
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  for name, stub in [("check_cudnn_version", lambda: 91000),
                     ("check_compute_capability", lambda c: True),
                     ("is_cuda_compute_capability_equal", lambda c: False)]:
    if not hasattr(fa, name):
      pytest.skip(f"jax internals moved ({name}); the GPU test covers the fallback")
    monkeypatch.setattr(fa, name, stub)
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


def test_smoke_mode_writes_reports_with_small_errors(tmp_path):
  if common.on_gpu():
    pytest.skip("smoke mode is the CPU path")
  out = tmp_path / "bench"
  res = bench.main(["--smoke", "--out", str(out), "--shape", "1x32x2x2x32", "--zigzag", "2x64",
                    "--backends", "pallas_triton,xla,cudnn,jax-pallas-mha,two-launch",
                    "--reps", "1", "--warmup", "0"])
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
      # The calibrated check (tests/tolerance.py) against the oracle.
      assert c["ok"] and c["ratio"] <= 1.0 and c["max_abs_err"] < 5e-2, (
          r["workload"], r["impl"], name, c)
      checked += 1
  assert checked >= 8, checked
  assert {r["pass"] for r in ran} == {"fwd", "bwd", "fwdbwd"}
  assert data["balance"] and data["summary"]["fastest"]
  # matplotlib is in the bench extra: the plots must be there.
  pytest.importorskip("matplotlib", reason="the [bench] extra installs matplotlib")
  assert res["plots"], "no plots written"
  for png in res["plots"]:
    assert (out / png).stat().st_size > 1000


@pytest.mark.gpu
def test_cudnn_composition_matches_oracle_on_gpu():
  # The composition calls jax's cuDNN custom_vjp rules directly: check that
  # this jax still has them (note) and that forward and merged backward are exact.
  wl = common.zigzag_workload(4, 2048, 1, hq=8, hk=2, d=64)
  built = impls.Cudnn().build(wl, impls.Context(gpu=True))
  assert "exact merged backward" in built.note, built.note
  q, k, v, do = common.make_inputs(wl, 0)
  sel = common.selection(wl)
  want = common.oracle(wl, q, k, v, do, sel)
  out, vjp = jax.vjp(jax.jit(built.fn), q, k, v)
  dq, dk, dv = jax.jit(vjp)(do)
  res = common.compare(sel.q(out), want, "out")
  assert res["ok"], ("out", res)
  for name, got in [("dq", sel.q(dq)), ("dk", sel.kv(dk)), ("dv", sel.kv(dv))]:
    res = common.compare(got, want, name)
    assert res["ok"], (name, res)


@pytest.mark.gpu
def test_bench_baselines_run_on_gpu(tmp_path):
  res = bench.main(["--out", str(tmp_path), "--shape", "1x1024x4x4x64", "--zigzag", "2x2048",
                    "--backends", "cudnn,jax-pallas-mha", "--reps", "2", "--warmup", "1",
                    "--sets", "1"])
  rows = res["rows"]
  bad = [(r["workload"], r["impl"], r["pass"], r.get("reason")) for r in rows
         if r["status"] in ("error", "wrong")]
  assert not bad, bad
  ok = {(r["impl"], r["family"]) for r in rows if r["status"] == "ok"}
  assert {("cudnn", "custom"), ("cudnn", "zigzag"), ("jax-pallas-mha", "custom")} <= ok
  assert (tmp_path / "bench.md").exists()
