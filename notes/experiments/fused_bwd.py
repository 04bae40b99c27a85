"""Issue 33, milestone 1: fwd+bwd of cuDNN, ours (deterministic default) and ours
with ``deterministic=False`` (pallas_mosaic's fused backward), interleaved rounds
of back-to-back calls in one process (common.time_calls), plus whole-tensor
gradient errors of each against the fp32 oracle; also the opt-in overlapped
forward (MosaicForwardConfig.overlap) with either backward, and the
overlapped dK/dV step (MosaicBackwardConfig.overlap: two kernels, ordered,
fused). Writes
$OUT/fused_bwd.json.

  python3 notes/experiments/fused_bwd.py [--shapes s8k,s32k,nc8k,d64] [--rounds 5]
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

import jax_grouped_attn as ga
from benchmarks import common
from jax_grouped_attn.pallas.mosaic import heuristics
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig

SHAPES = {   # name: (batch, seq, hq, hk, d, causal)
    "s8k": (1, 8192, 32, 8, 128, True),
    "s32k": (1, 32768, 32, 8, 128, True),
    "nc8k": (1, 8192, 32, 8, 128, False),
    "d64": (4, 4096, 16, 16, 64, True),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="s8k,s32k,nc8k,d64")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--passes", type=int, default=3, help="interleaved passes over the impls")
  ap.add_argument("--exclude", default="", help="comma-separated impl names to leave out")
  args = ap.parse_args()
  res = {"env": common.environment(), "shapes": {}}
  for name in args.shapes.split(","):
    b, s, hq, hk, d, causal = SHAPES[name]
    wl = common.causal_workload(b, s, hq, hk, d)
    if not causal:
      wl = dataclasses.replace(wl, causal=False)
    sets = [common.make_inputs(wl, seed) for seed in range(2)]
    impls = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                             implementation="cudnn"),
        "ours": lambda q, k, v: ga.attention(q, k, v, causal=causal),
        "ours_nondet": lambda q, k, v: ga.attention(q, k, v, causal=causal, deterministic=False),
    }
    variants = (
        ("fused_kvmajor", MosaicBackwardConfig(fused_dq=True, kv_major=True), False),
        ("two_kernel_kvmajor", MosaicBackwardConfig(kv_major=True), True),
        ("ordered", MosaicBackwardConfig(fused_dq=True, ordered=True), True),
        ("ordered_kvmajor", MosaicBackwardConfig(fused_dq=True, ordered=True, kv_major=True),
         True),
        ("bwd_overlap", MosaicBackwardConfig(overlap=True), True),
        ("ordered_overlap", MosaicBackwardConfig(fused_dq=True, ordered=True, overlap=True),
         True),
        ("fused_overlap", MosaicBackwardConfig(fused_dq=True, overlap=True), False),
    )
    for name_, bcfg, det in variants:
      if d > 64 or bcfg.fused_dq:
        cfg = ga.AttentionConfig(backward=bcfg)
        impls[name_] = (lambda q, k, v, cfg=cfg, det=det: ga.attention(
            q, k, v, causal=causal, backend="pallas_mosaic", config=cfg, deterministic=det))
    overlap = ga.AttentionConfig(
        forward=dataclasses.replace(heuristics.forward_config(d), overlap=True))
    for name_, det in (("overlap", True), ("overlap_nondet", False)):
      impls[name_] = (lambda q, k, v, det=det: ga.attention(
          q, k, v, causal=causal, backend="pallas_mosaic", config=overlap, deterministic=det))
    impls = {n: f for n, f in impls.items() if n not in args.exclude.split(",")}
    fns = {n: jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do)) for n, f in impls.items()}
    fwd = {n: jax.jit(f) for n, f in impls.items()}
    row = {"shape": dict(b=b, s=s, hq=hq, hk=hk, d=d, causal=causal), "ms": {}, "fwd_ms": {},
           "err": {}}
    q, k, v, do = sets[0]
    want = common.oracle(wl, q, k, v, do)
    for n, g in fns.items():
      t0 = time.perf_counter()
      try:
        got = jax.block_until_ready(g(q, k, v, do))
      except Exception as e:  # noqa: BLE001
        print(f"{name} {n}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        row["err"][n] = f"failed: {type(e).__name__}"
        continue
      row["err"][n] = {gn: {kk: vv for kk, vv in common.compare(x, want, gn).items()
                            if kk in ("ok", "max_err", "ratio")}
                       for gn, x in zip(("dq", "dk", "dv"), got)}
      print(f"{name} {n} compile+run {time.perf_counter() - t0:.1f}s errors "
            + " ".join(f"{gn}={e['max_err']:.2e}{'' if e['ok'] else '(FAIL)'}"
                       for gn, e in row["err"][n].items()), flush=True)
    del want
    for p in range(args.passes):
      for n in fns:
        if isinstance(row["err"].get(n), str):
          continue
        t = common.time_calls(fns[n], sets, rounds=args.rounds, warmup=1)["median_ms"]
        tf = common.time_calls(fwd[n], [x[:3] for x in sets], rounds=args.rounds,
                               warmup=1)["median_ms"]
        row["ms"].setdefault(n, []).append(t)
        row["fwd_ms"].setdefault(n, []).append(tf)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    c = med(row["ms"]["cudnn"])
    for n in row["ms"]:
      print(f"{name} {n:12} fwd {med(row['fwd_ms'][n]):7.3f} ms  fwd+bwd {med(row['ms'][n]):7.3f} ms"
            f"  cuDNN/this fwd+bwd {c / med(row['ms'][n]):.3f}x", flush=True)
    res["shapes"][name] = row
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fused_bwd.json"), "w"),
              indent=1)


if __name__ == "__main__":
  main()
