"""fwd+bwd time: deterministic default vs fused_dq candidates vs cuDNN, one run.

A log, not code that runs today: ``BackwardConfig(fused_dq=True)`` existed only in the
Triton fused-dQ experiment (commit dcff9dd, dropped as slower on the H100); check that
commit out to re-run it.
"""
import json, os, jax, jax.numpy as jnp, numpy as np
import jax_grouped_attn as ga
from benchmarks import common
res = {}
for hk in (8, 32):
  wl = common.causal_workload(1, 8192, 32, hk, 128)
  sets = [common.make_inputs(wl, s) for s in range(2)]
  sel = common.selection(wl, max_kv_heads=1)
  q, k, v, do = sets[0]
  want = jax.device_get(common.oracle(wl, q, k, v, do, sel))
  def run(name, f):
    g = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    try:
      got = g(q, k, v, do)
      tol = common.GRAD_TOL[wl.dtype]
      ok = [common.compare(sel.q(got[0]), want["dq"], tol)["ok"], common.compare(sel.kv(got[1]), want["dk"], tol)["ok"],
            common.compare(sel.kv(got[2]), want["dv"], tol)["ok"]]
      t = common.time_calls(g, sets, reps=20, warmup=3)["median_ms"]
      print(f"Hk{hk} {name:40} {t:8.3f} ms  correct={all(ok)}", flush=True)
      res[f"Hk{hk} {name}"] = dict(ms=t, ok=all(ok))
    except Exception as e:
      print(f"Hk{hk} {name}: FAILED {type(e).__name__} {str(e)[:200]}", flush=True)
  run("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
  run("triton default (deterministic)", lambda q, k, v: ga.attention(q, k, v, causal=True, backend="triton"))
  for c in [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2)]:
    cfg = ga.AttentionConfig(backward=ga.BackwardConfig(*c, fused_dq=True))
    run(f"triton fused_dq {c}", lambda q, k, v, cfg=cfg: ga.attention(q, k, v, causal=True, backend="triton", config=cfg))
  run("cudnn (again)", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
json.dump(res, open(os.path.join(os.environ["OUT"], "fused.json"), "w"), indent=1)
