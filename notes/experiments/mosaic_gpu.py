"""The one GPU script of the Mosaic GPU work (notes/mosaic.md logs its runs).

Run on the device machine from the repository root (or its .xfer_mosaic copy):
  PYTHONUNBUFFERED=1 python3 notes/experiments/mosaic_gpu.py --dump --baseline
Flags pick what runs; every timing of a Mosaic kernel is paired with cuDNN in
the same process. Logs go to $OUT (or /tmp), a short table is printed last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _alias_pallas_package():
  """`pallas/` is installed as jax_grouped_attn.pallas by pyproject; with only
  PYTHONPATH set, point the subpackage at the folder (no pip install needed)."""
  import importlib.util
  import jax_grouped_attn
  name = "jax_grouped_attn.pallas"
  if name in sys.modules:
    return
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "pallas", "__init__.py"),
      submodule_search_locations=[os.path.join(ROOT, "pallas")])
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  jax_grouped_attn.pallas = mod


OUT = os.environ.get("OUT", "/tmp/mosaic_out")
os.makedirs(OUT, exist_ok=True)
ROWS = []   # (name, ms, tflops, ratio-vs-cudnn or "")


def log(*a):
  msg = " ".join(str(x) for x in a)
  print(msg, flush=True)
  with open(os.path.join(OUT, "log.txt"), "a") as f:
    f.write(msg + "\n")


def bench(fn, *args, iters=20, reps=7):
  """Median ms of `iters` back-to-back calls (async dispatch), over `reps`."""
  import jax
  out = fn(*args)
  jax.block_until_ready(out)
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(times)


def bench_pair(fa, aa, fb, ab, rounds=6):
  """Medians (ms) of fa(*aa) and fb(*ab), measured alternately so drift hits both."""
  ta, tb = [], []
  for _ in range(rounds):
    ta.append(bench(fa, *aa, iters=10, reps=3))
    tb.append(bench(fb, *ab, iters=10, reps=3))
  return statistics.median(ta), statistics.median(tb)


def dump_sources():
  import jax
  base = os.path.dirname(jax.__file__)
  files = ["experimental/pallas/ops/gpu/attention_mgpu.py",
           "_src/pallas/mosaic_gpu/primitives.py", "_src/pallas/mosaic_gpu/pipeline.py",
           "_src/pallas/mosaic_gpu/core.py", "_src/pallas/mosaic_gpu/lowering.py",
           "experimental/pallas/mosaic_gpu.py", "experimental/mosaic/gpu/layout_inference.py"]
  for f in files:
    p = os.path.join(base, f)
    if os.path.exists(p):
      shutil.copy(p, os.path.join(OUT, f.replace("/", "__")))
    else:
      log("missing", p)


def causal_flops(s, hq, d, bwd=False):
  f = 4 * s * s * d * hq / 2
  return f * (2.5 if bwd else 1.0)


def baseline(seqs):
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  hq, hk, d = 32, 8, 128
  for s in seqs:
    ks = jax.random.split(jax.random.key(0), 3)
    for dt in (jnp.float16, jnp.bfloat16):
      q = jax.random.normal(ks[0], (1, s, hq, d), dt)
      k = jax.random.normal(ks[1], (1, s, hk, d), dt)
      v = jax.random.normal(ks[2], (1, s, hk, d), dt)
      cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"))
      t_c = bench(cud, q, k, v)
      fl = causal_flops(s, hq, d)
      ROWS.append((f"cudnn fwd {jnp.dtype(dt).name} S={s}", t_c, fl / t_c / 1e9, 1.0))
      cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
      try:
        f = jax.jit(lambda q, k, v: am.attention(q, k, v, cfg))
        o = f(q, k, v)
        ref = cud(q, k, v)
        err = float(jnp.linalg.norm((o - ref).astype(jnp.float32)) /
                    jnp.linalg.norm(ref.astype(jnp.float32)))
        t = bench(f, q, k, v)
        ROWS.append((f"jax attention_mgpu {jnp.dtype(dt).name} S={s} err={err:.1e}", t,
                     fl / t / 1e9, t_c / t))
      except Exception as e:  # bf16 is expected to fail: fp16 scratch
        log(f"attention_mgpu {jnp.dtype(dt).name} failed: {type(e).__name__}: {str(e)[:400]}")
        ROWS.append((f"jax attention_mgpu {jnp.dtype(dt).name} S={s} FAILED", float("nan"), 0, 0))


# ------------------------------------------------------------ mosaic kernels --

def _mosaic():
  _alias_pallas_package()
  from jax_grouped_attn.pallas.mosaic import launch as ml
  return ml


def problem(groups, *, b=1, tq, tk, hq, hk, d, causal, seg=False, scale=None):
  import math
  from jax_grouped_attn.groups import QueryGroup
  from jax_grouped_attn.plan import Problem
  groups = tuple(QueryGroup(*g) for g in groups)
  return Problem(groups=groups, batch=b, tq=tq, tk=tk, hq=hq, hk=hk, head_dim=d, causal=causal,
                 scale=scale if scale is not None else 1 / math.sqrt(d), has_segments=seg)


def mosaic_forward(p, cfg=None):
  """(q, k, v, qs, ks) -> (out, lse) on the original layout, like autodiff."""
  import jax
  from jax_grouped_attn import autodiff
  ml = _mosaic()
  plan = ml.forward_plan(p, cfg)

  def f(q, k, v, qs, ks):
    qp, kp, vp, qsp, ksp = autodiff._prepare(p, plan, q, k, v, qs, ks)
    out, lse = ml.forward(qp, kp, vp, qsp, ksp, problem=p, plan=plan, config=cfg)
    out = autodiff.from_q_layout(out, plan)[..., :p.head_dim]
    return out, autodiff.from_q_layout(lse, plan, axis=2)
  return jax.jit(f)


def mosaic_fwd_bwd(p, fcfg=None, bcfg=None):
  """(q, k, v, qs, ks, dout, dlse) -> (out, lse, dq, dk, dv) through the launchers."""
  import jax
  import jax.numpy as jnp
  from jax_grouped_attn import autodiff
  ml = _mosaic()
  fplan = ml.forward_plan(p, fcfg)
  bplan = ml.backward_plan(p, bcfg)

  def f(q, k, v, qs, ks, dout, dlse):
    qp, kp, vp, qsp, ksp = autodiff._prepare(p, fplan, q, k, v, qs, ks)
    out_p, lse_p = ml.forward(qp, kp, vp, qsp, ksp, problem=p, plan=fplan, config=fcfg)
    out = autodiff.from_q_layout(out_p, fplan)[..., :p.head_dim]
    lse = autodiff.from_q_layout(lse_p, fplan, axis=2)
    plan = bplan.plan
    qp, kp, vp, qsp, ksp = autodiff._prepare(p, plan, q, k, v, qs, ks)
    dp = qp.shape[-1]
    o2 = autodiff.to_q_layout(autodiff._pad_axis(out, 3, dp), plan)
    do2 = autodiff.to_q_layout_zero_padded(autodiff._pad_axis(dout, 3, dp), plan)
    l2 = autodiff.to_q_layout(lse, plan, axis=2)
    dl2 = autodiff.to_q_layout_zero_padded(dlse, plan, axis=2)
    dq, dk, dv = ml.backward(qp, kp, vp, qsp, ksp, o2, l2, do2, dl2, problem=p, plan=bplan,
                             config=bcfg)
    d = p.head_dim
    return (out, lse, autodiff.from_q_layout(dq, plan)[..., :d], dk[:, :p.tk, :, :d],
            dv[:, :p.tk, :, :d])
  return jax.jit(f)


def inputs(p, dtype, seed=0, nseg=3):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (p.batch, p.tq, p.hq, p.head_dim), dtype)
  k = jax.random.normal(ks[1], (p.batch, p.tk, p.hk, p.head_dim), dtype)
  v = jax.random.normal(ks[2], (p.batch, p.tk, p.hk, p.head_dim), dtype)
  qs = ksg = None
  if p.has_segments:
    qs = jnp.sort(jax.random.randint(ks[3], (p.batch, p.tq), 0, nseg), axis=1).astype(jnp.int32)
    ksg = jnp.sort(jax.random.randint(ks[4], (p.batch, p.tk), 0, nseg), axis=1).astype(jnp.int32)
  dout = jax.random.normal(ks[5], q.shape, dtype)
  dlse = jax.random.normal(ks[6], (p.batch, p.hq, p.tq), jnp.float32)
  return q, k, v, qs, ksg, dout, dlse


def _rel(a, b):
  import jax.numpy as jnp
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def _lse_err(lse, ref):
  import jax.numpy as jnp
  fin = jnp.isfinite(ref)
  same_inf = bool(jnp.all(jnp.where(fin, True, lse == ref)))
  err = float(jnp.max(jnp.where(fin, jnp.abs(lse - ref), 0.0)))
  return err if same_inf else float("inf")


CASES = [
    # name, groups (q_start, q_len, q_pos, kv_len), tq, tk, hq, hk, d, causal, seg
    ("causal S1024 GQA4", [(0, 1024, 0, 1024)], 1024, 1024, 8, 2, 128, True, False),
    ("noncausal odd 333x320 MQA", [(0, 333, 0, 320)], 333, 320, 4, 1, 128, False, False),
    ("groups zigzag+kv0+neg", [(0, 200, 700, 1000), (200, 150, -60, 500), (350, 70, 0, 0),
                               (420, 300, 100, 1000)], 720, 1000, 4, 2, 128, True, False),
    ("segments causal", [(0, 640, 0, 640)], 640, 640, 4, 2, 128, True, True),
    ("groups+segments noncausal", [(0, 300, 0, 500), (300, 200, 10, 200)], 500, 500, 4, 4,
     128, False, True),
    ("D64 causal", [(0, 512, 0, 512)], 512, 512, 4, 2, 64, True, False),
    ("D40 pad causal", [(0, 200, 0, 256)], 200, 256, 2, 1, 40, True, False),
    ("tiny 10x7", [(0, 10, 3, 7)], 10, 7, 2, 1, 128, True, False),
    ("D256 causal", [(0, 384, 0, 384)], 384, 384, 4, 2, 256, True, False),
]


def check(kind, dtypes=("bfloat16",), bwd=False, only=None, bcfg=None, fcfg=None):
  import jax
  import jax.numpy as jnp
  from jax_grouped_attn.reference import reference_attention, reference_backward
  for (name, groups, tq, tk, hq, hk, d, causal, seg) in CASES:
    if only and not any(o in name for o in only):
      continue
    for dtn in dtypes:
      dt = jnp.dtype(dtn)
      p = problem(groups, tq=tq, tk=tk, hq=hq, hk=hk, d=d, causal=causal, seg=seg)
      q, k, v, qs, ks, dout, dlse = inputs(p, dt, seed=hash(name) % 1000)
      tag = f"{kind} {name} {dtn}"
      try:
        ro, rl = reference_attention(p, q, k, v, qs, ks)
        if not bwd:
          o, l = mosaic_forward(p, fcfg)(q, k, v, qs, ks)
          nan = bool(jnp.isnan(o.astype(jnp.float32)).any() | jnp.isnan(l).any())
          eo, el = _rel(o, ro), _lse_err(l, rl)
          ok = (not nan) and eo < 2e-2 and el < 2e-2
          tag = f"{tag} {fcfg}"
          log(f"{tag}: out rel {eo:.2e} lse abs {el:.2e} nan={nan} {'OK' if ok else 'FAIL'}")
          ROWS.append((("ok   " if ok else "FAIL ") + tag, eo, el, 0))
        else:
          fb = mosaic_fwd_bwd(p, None, bcfg)
          o, l, dq, dk, dv = fb(q, k, v, qs, ks, dout, dlse)
          again = fb(q, k, v, qs, ks, dout, dlse)
          same = all(bool(jnp.array_equal(x, y)) for x, y in zip((dq, dk, dv), again[2:]))
          rq, rk, rv = reference_backward(p, q, k, v, qs, ks, ro, rl, dout, dlse)
          errs = [_rel(o, ro), _rel(dq, rq), _rel(dk, rk), _rel(dv, rv)]
          nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in (o, dq, dk, dv))
          ok = (not nan) and max(errs) < 3e-2 and _lse_err(l, rl) < 2e-2
          log(f"{tag} {bcfg}: out/dq/dk/dv rel {['%.2e' % e for e in errs]} nan={nan} "
              f"bitwise-repeatable={same} {'OK' if ok else 'FAIL'}")
          ROWS.append((("ok   " if ok else "FAIL ") + tag, errs[1], max(errs[2:]), 0))
      except Exception:
        tb = traceback.format_exc()
        log(f"{tag} raised:\n{tb[:5000]}\n...\n{tb[-2500:]}")
        ROWS.append(("ERR  " + tag, float("nan"), 0, 0))


def timing(seqs, configs, bwd=False, dims=(128,)):
  import jax
  import jax.numpy as jnp
  ml = _mosaic()
  from jax_grouped_attn.pallas.mosaic.config import MosaicForwardConfig, MosaicBackwardConfig
  hq, hk = 32, 8
  for d in dims:
    for s in seqs:
      p = problem([(0, s, 0, s)], tq=s, tk=s, hq=hq, hk=hk, d=d, causal=True)
      q, k, v, _, _, dout, _ = inputs(p, jnp.bfloat16, seed=1)
      fl = causal_flops(s, hq, d, bwd)
      if not bwd:
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
      else:
        def loss(q, k, v, do):
          o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
          return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
        cud = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      for cfg in configs:
        try:
          if not bwd:
            fcfg = MosaicForwardConfig(*cfg) if cfg else None
            f = mosaic_forward(p, fcfg)
            args = (q, k, v, None, None)
          else:
            fcfg = None
            bcfg = MosaicBackwardConfig(*cfg) if cfg else None
            g = mosaic_fwd_bwd(p, None, bcfg)
            dl = jnp.zeros((1, hq, s), jnp.float32)
            f = jax.jit(lambda q, k, v, do, dl: g(q, k, v, None, None, do, dl)[2:])
            args = (q, k, v, dout, dl)
          t, t_c = bench_pair(f, args, cud, (q, k, v) + ((dout,) if bwd else ()))
          tag = "fwd+bwd" if bwd else "fwd"
          ROWS.append((f"cudnn {tag} S={s} D={d} (paired)", t_c, fl / t_c / 1e9, 1.0))
          ROWS.append((f"mosaic {tag} S={s} D={d} {cfg}", t, fl / t / 1e9, t_c / t))
          log(f"timing {tag} S={s} D={d} {cfg}: mosaic {t:.3f} ms cudnn {t_c:.3f} ms "
              f"ratio {t_c / t:.3f}")
        except Exception:
          log(f"timing {cfg} raised:\n{traceback.format_exc()[-3000:]}")
          ROWS.append((f"ERR mosaic S={s} {cfg}", float("nan"), 0, 0))


def probe():
  """Which scalar reads of a GMEM int32 table lower (jax 0.11 layout inference)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  tab2 = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)

  def run(name, tab, read):
    def body(t_ref, o_ref, smem):
      w = lax.axis_index("w")
      val = read(t_ref, w)
      smem[...] = jnp.full((128,), val, jnp.int32)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(smem, o_ref.at[w])
      plgpu.wait_smem_to_gmem(0)
    try:
      out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((4, 128), jnp.int32),
                         scratch_types=[plgpu.SMEM((128,), jnp.int32)], grid=(4,),
                         grid_names=("w",))(tab)
      log(f"probe {name}: OK {out[:, 0].tolist()}")
    except Exception:
      log(f"probe {name}: FAIL\n{traceback.format_exc()[-2500:]}")
  run("2d t[w,3]", tab2, lambda t, w: t[w, 3])
  run("1d t[w*8+3]", tab2.reshape(-1), lambda t, w: t[w * 8 + 3])
  run("2d t.at[w][3]", tab2, lambda t, w: t.at[w][3])
  run("1d t[3] static", tab2.reshape(-1), lambda t, w: t[3] + w)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump", action="store_true")
  ap.add_argument("--baseline", action="store_true")
  ap.add_argument("--seqs", default="8192")
  ap.add_argument("--check", action="store_true", help="forward case matrix")
  ap.add_argument("--check-bwd", action="store_true", help="fwd+bwd case matrix")
  ap.add_argument("--only", default="", help="comma list of case-name substrings")
  ap.add_argument("--dtypes", default="bfloat16,float16")
  ap.add_argument("--time", action="store_true", help="forward vs cuDNN")
  ap.add_argument("--time-bwd", action="store_true", help="fwd+bwd vs cuDNN")
  ap.add_argument("--configs", default="None", help="';'-separated config tuples or None")
  ap.add_argument("--bconfigs", default="None", help="backward config tuples for --time-bwd")
  ap.add_argument("--dims", default="128")
  ap.add_argument("--probe", action="store_true")
  ap.add_argument("--fcheck", default="None", help="';'-separated forward configs for --check")
  ap.add_argument("--bcheck", default="None", help="backward config tuple for --check-bwd "
                  "(a 7th field, deterministic=False, existed at commit f931807 only)")
  args = ap.parse_args()
  import jax
  log("jax", jax.__version__, jax.devices())
  seqs = [int(x) for x in args.seqs.split(",")]
  if args.dump:
    dump_sources()
  only = [o for o in args.only.split(",") if o]
  fchecks = [None]
  if args.fcheck != "None":
    _mosaic()
    from jax_grouped_attn.pallas.mosaic.config import MosaicForwardConfig
    fchecks = [None if c == "None" else MosaicForwardConfig(*eval(c))
               for c in args.fcheck.split(";")]
  bcheck = None
  if args.bcheck != "None":
    _mosaic()
    from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
    bcheck = MosaicBackwardConfig(*eval(args.bcheck))
  dts = args.dtypes.split(",")
  configs = [eval(c) for c in args.configs.split(";")]
  dims = [int(x) for x in args.dims.split(",")]
  steps = [("probe", args.probe, probe),
           ("baseline", args.baseline, lambda: baseline(seqs)),
           ("check", args.check, lambda: [check("fwd", dts, False, only, fcfg=f) for f in fchecks]),
           ("check-bwd", args.check_bwd, lambda: check("bwd", dts, True, only, bcheck)),
           ("time", args.time, lambda: timing(seqs, configs, False, dims)),
           ("time-bwd", args.time_bwd,
            lambda: timing(seqs, [eval(c) for c in args.bconfigs.split(";")], True, dims))]
  for name, on, fn in steps:
    if not on:
      continue
    try:
      fn()
    except Exception:
      log(f"{name} failed:\n{traceback.format_exc()}")
  log("\n%-60s %9s %8s %7s" % ("case", "ms|err", "TF/s|err", "xcuDNN"))
  for name, ms, tf, r in ROWS:
    log("%-60s %9.3f %8.1f %7.3f" % (name, ms, tf, r))


if __name__ == "__main__":
  main()
